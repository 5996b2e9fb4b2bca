"""The tutorial as a book a learner can read without running it (the ``make book`` command).

    python -m segx_helpers.cli.book [--root ROOT] [--out DIR]

Builds a static HTML site from the notebooks that ``make tutorial`` executed (``<root>/outputs/notebooks/``; they
are never executed again) with Sphinx, myst-nb and sphinx-book-theme (the ``docs`` extra): the README as the landing
page, notebooks 01-08 in order with their figures and tables, then the pages of docs/ (:data:`PAGES`). Each
notebook page starts with its Colab badge and how it was run (mode, device, start, commit, run time: the runner's
``outputs/timings.json``). The Sphinx project is written to ``<out>/source`` and the site to
``<out>/html`` (default ``<root>/outputs/book``); open ``<out>/html/index.html`` from disk. The site loads nothing
from the network: the Colab badge is a local picture, math (``$...$`` and ``$$...$$``) is rendered by the MathJax
that sphinx-mathjax-offline bundles, and :func:`remote_resources` checks every page. Nothing of the machine that ran
the notebooks shows: papermill's injected-parameters cell is left out (the run header says the mode and parameters)
and the run's absolute paths in the notebooks are written relative to ``ROOT`` (:func:`without_machine_paths`).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import nbformat

from segx_helpers.workflows.settings import NOTEBOOKS, colab_badge
from segx_helpers.workflows.report import read_run_records

REPO_ROOT = Path(__file__).resolve().parents[2]
MARKER = ".made-by-segx-book"
PAGES = ("docs/real-data.md", "docs/colab.md", "docs/audit.md", "docs/scale.md", "docs/REFERENCE.md", "docs/NOTES.md")
"""Markdown pages after the notebooks, as paths in the repository."""
FOLDERS = ("docs/figures",)
"""Folders of the repository the pages refer to (pictures), copied as they are."""
BADGE_FILE = "colab-badge.svg"
BADGE_SVG = """\
<svg xmlns="http://www.w3.org/2000/svg" width="117" height="20" role="img" aria-label="Open in Colab">
<rect width="117" height="20" rx="3" fill="#555"/><rect x="25" width="92" height="20" rx="3" fill="#f9ab00"/>
<rect x="25" width="6" height="20" fill="#f9ab00"/>
<circle cx="9" cy="10" r="4.5" fill="none" stroke="#f9ab00" stroke-width="2.5"/>
<circle cx="16" cy="10" r="4.5" fill="none" stroke="#e8710a" stroke-width="2.5"/>
<text x="71" y="14" fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11"
 text-anchor="middle">Open in Colab</text>
</svg>
"""
CONF = """\
# Written by segx_helpers.cli.book (make book): rewritten on every build.
project = "SegX tutorials"
html_title = "SegX tutorials"
extensions = ["myst_nb", "sphinx-mathjax-offline"]  # MathJax from the package, not from a CDN
root_doc = "index"
exclude_patterns = []
html_theme = "sphinx_book_theme"
html_theme_options = {"show_toc_level": 2, "use_download_button": False, "use_fullscreen_button": False}
html_copy_source = False
html_show_sourcelink = False
myst_enable_extensions = ["dollarmath"]  # $...$ and $$...$$ math, as Jupyter and Colab show it
nb_execution_mode = "off"            # the notebooks were executed by make tutorial
nb_output_stderr = "remove"          # progress bars and warnings
nb_ipywidgets_js = {}                # no widget JavaScript from a CDN (widget outputs are replaced by a note)
"""


class BookError(RuntimeError):
    """The book cannot be built; the message says what to do."""


def executed_notebooks(root: str | Path) -> dict[str, Path]:
    """The tutorial notebooks ``make tutorial`` executed under ``root`` (name -> path), in order.

    Raises :class:`BookError` saying to run ``make tutorial`` when there is none."""
    folder = Path(root) / "outputs" / "notebooks"
    found = {name: folder / f"{name}.ipynb" for name in NOTEBOOKS if (folder / f"{name}.ipynb").is_file()}
    if not found:
        raise BookError(f"no executed notebooks in {folder}: run `make tutorial` first (the book shows the notebooks "
                        "as that run executed them, it does not run them)")
    return found


def duration(seconds: float) -> str:
    """``75.2`` -> ``1 min 15 s``; ``42`` -> ``42 s``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def run_header(record: dict | None) -> str:
    """One Markdown line saying how a notebook was run, from its runner record (None: no record)."""
    if not record:
        return "> *How this notebook was run is not recorded (no entry in outputs/timings.json).*"
    started = str(record.get("started", "")).replace("T", " ").replace("+00:00", " UTC")
    parameters = ", ".join(f"`{k} = {v!r}`" for k, v in (record.get("parameters") or {}).items())
    parts = [f"**{record['mode']}** mode" if record.get("mode") else None,
             f"on **{record['device']}**" if record.get("device") else None,
             f"started {started}" if started else None,
             f"commit `{record['commit']}`" if record.get("commit") else None,
             f"with {parameters}" if parameters else None]
    how = ", ".join(p for p in parts if p)
    took = f"; it ran in {duration(record['seconds'])}" if "seconds" in record else ""
    return f"> Executed by `make tutorial` ({how}){took}."


def with_run_header(nb: nbformat.NotebookNode, name: str, record: dict | None) -> nbformat.NotebookNode:
    """A copy of ``nb`` whose first Markdown cell shows the Colab badge (a local picture, linking to Colab) and
    :func:`run_header` right under the title: in place of the notebook's own badge, or after its first heading."""
    nb = copy.deepcopy(nb)
    remote_badge = colab_badge(name)
    local_badge = remote_badge.replace("https://colab.research.google.com/assets/colab-badge.svg", BADGE_FILE)
    header = f"{local_badge}\n\n{run_header(record)}"
    cell = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if cell is None:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(header))
    elif remote_badge in cell.source:
        cell.source = cell.source.replace(remote_badge, header)
    else:
        lines = cell.source.split("\n")
        at = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
        cell.source = "\n".join(lines[:at] + ["", header, ""] + lines[at:])
    return nb


WIDGET = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = "*An interactive widget: open the notebook in Jupyter or Colab to use it.*"


def without_widgets(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` whose widget outputs (which need a kernel) say so in words instead of their text
    fallback (e.g. ``VBox(children=...)``)."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if WIDGET in output.get("data", {}):
                output["data"] = {"text/markdown": WIDGET_NOTE}
    return nb


INJECTED = "injected-parameters"
"""The tag of the cell papermill adds after a notebook's parameters cell (``QUICK``, ``ROOT``: the run's own values)."""


def without_machine_paths(nb: nbformat.NotebookNode, root: Path) -> nbformat.NotebookNode:
    """A copy of ``nb`` without papermill's injected-parameters cell, and with every text of its cells and outputs
    naming the run's folder ``root`` (an absolute path of the machine that ran it) written as ``ROOT`` instead, the
    notebooks' parameter for that folder."""
    nb = copy.deepcopy(nb)
    nb.cells = [cell for cell in nb.cells if INJECTED not in cell.get("metadata", {}).get("tags", [])]
    spellings = sorted({str(Path(root).absolute()), str(Path(root).resolve())}, key=len, reverse=True)
    for cell in nb.cells:
        cell.source = _relative_to_root(cell.source, spellings)
        for output in cell.get("outputs", []):
            if isinstance(output.get("text"), str):
                output["text"] = _relative_to_root(output["text"], spellings)
            for kind, value in output.get("data", {}).items():
                if isinstance(value, str) and kind.startswith("text/"):
                    output["data"][kind] = _relative_to_root(value, spellings)
    return nb


def _relative_to_root(text: str, spellings: list[str]) -> str:
    """``text`` with each spelling of the run's folder (longest first: a symlinked folder has two) as ``ROOT``."""
    for spelling in spellings:
        text = text.replace(spelling, "ROOT")
    return text


def prepare_folder(folder: Path) -> None:
    """Empty ``folder`` for a new build if this module made it (it holds :data:`MARKER`); refuse any other."""
    if folder.exists():
        if not (folder / MARKER).is_file():
            raise BookError(f"{folder} exists and was not made by `make book`: move it away or choose another --out")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("Made by segx_helpers.cli.book; emptied on every build.\n")


def stage_source(root: str | Path, source: Path, repo: Path = REPO_ROOT) -> list[str]:
    """Write the Sphinx project to ``source``: conf.py, index.md (the README and the table of contents), the
    executed notebooks with their run headers, the pages and the pictures they show. Returns the notebook names."""
    notebooks = executed_notebooks(root)
    records = read_run_records(root)
    prepare_folder(source)
    (source / "conf.py").write_text(CONF)
    (source / "notebooks").mkdir()
    (source / "notebooks" / BADGE_FILE).write_text(BADGE_SVG)
    for name, path in notebooks.items():
        nb = without_machine_paths(without_widgets(nbformat.read(path, as_version=4)), root)
        nb = with_run_header(nb, name, records.get(name))
        nbformat.write(nb, source / "notebooks" / f"{name}.ipynb")
    pages = [page for page in PAGES if (repo / page).is_file()]
    for page in pages:
        (source / page).parent.mkdir(parents=True, exist_ok=True)
        text = (repo / page).read_text(encoding="utf-8")
        (source / page).write_text(re.sub(r"\]\((\.\./)+README\.md", lambda m: m.group(0)[:-9] + "index.md", text),
                                   encoding="utf-8")
    for folder in FOLDERS:
        if (repo / folder).is_dir():
            shutil.copytree(repo / folder, source / folder)
    entries = [f"notebooks/{name}" for name in notebooks] + [page.removesuffix(".md") for page in pages]
    toc = "\n".join(["", "```{toctree}", ":hidden:", ":caption: The tutorial", "", *entries, "```", ""])
    (source / "index.md").write_text((repo / "README.md").read_text(encoding="utf-8") + toc, encoding="utf-8")
    return list(notebooks)


REMOTE_URL = re.compile(r"(?:https?:)?//", re.IGNORECASE)
CSS_LOAD = re.compile(r"""@import\s+(?:url\(\s*)?["']?([^"')\s;]+)|url\(\s*["']?([^"')\s]+)""", re.IGNORECASE)
NOT_LOADS = {"a": ("href",), "area": ("href",), "base": ("href",)}
"""Attributes that are links a reader may click (or the page's base address), not loads."""
LOAD_ATTRIBUTES = ("src", "href", "xlink:href", "data", "poster", "srcset", "background")
"""Attributes whose address the browser fetches as it shows the page (``href`` of any element but a link)."""


class _LoadFinder(HTMLParser):
    """Collects ``(where, url)`` for every remote address a page loads: the attributes of
    :data:`LOAD_ATTRIBUTES`, the candidates of a ``srcset``, and CSS ``url()`` / ``@import`` in ``style``
    attributes and ``<style>`` elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, str]] = []
        self.in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.in_style = tag == "style"
        for name, value in attrs:
            if not value:
                continue
            if name == "style":
                self.found += [(f"{tag} style {kind}", url) for kind, url in css_loads(value)]
            elif name in LOAD_ATTRIBUTES and name not in NOT_LOADS.get(tag, ()):
                urls = [part.split()[0] for part in value.split(",") if part.strip()] if name == "srcset" else [value]
                self.found += [(f"{tag} {name}", url.strip()) for url in urls if REMOTE_URL.match(url.strip())]

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self.in_style = False

    def handle_data(self, data: str) -> None:
        if self.in_style:
            self.found += [(f"style {kind}", url) for kind, url in css_loads(data)]


def css_loads(css: str) -> list[tuple[str, str]]:
    """``("@import" | "url()", url)`` for every remote address a piece of CSS loads, in order."""
    found = []
    for match in CSS_LOAD.finditer(css):
        url, kind = (match.group(1), "@import") if match.group(1) is not None else (match.group(2), "url()")
        if REMOTE_URL.match(url):
            found.append((kind, url))
    return found


def remote_resources(html_dir: Path) -> list[str]:
    """``page: <what> url`` for every script, style sheet, font, picture, frame, object or poster a built page or
    style sheet loads from the network (HTML attributes, ``srcset``, ``<svg><image>``, CSS ``url()`` and
    ``@import``; links a reader may click are not loads and are not listed). Empty for a self-contained site."""
    found = []
    for path in sorted(p for p in html_dir.rglob("*") if p.suffix in (".html", ".css") and p.is_file()):
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".css":
            loads = [(f"css {kind}", url) for kind, url in css_loads(text)]
        else:
            finder = _LoadFinder()
            finder.feed(text)
            finder.close()
            loads = finder.found
        found += [f"{path.relative_to(html_dir)}: <{where}> {url}" for where, url in loads]
    return found


def build_book(root: str | Path, out: str | Path | None = None, repo: Path = REPO_ROOT) -> Path:
    """Build the site for the executed notebooks under ``root`` into ``<out>/html`` (``out`` defaults to
    ``<root>/outputs/book``) and return the path of its ``index.html``.

    Raises :class:`BookError` when the notebooks were not executed, the ``docs`` extra is not installed, Sphinx
    fails, or a page would load something from the network."""
    if any(importlib.util.find_spec(name) is None for name in ("myst_nb", "sphinx_book_theme", "sphinx-mathjax-offline")):
        raise BookError("the book needs the docs extra: pip install -e '.[docs]' (make book installs it)")
    out = Path(out) if out is not None else Path(root) / "outputs" / "book"
    out.mkdir(parents=True, exist_ok=True)
    source, html = out / "source", out / "html"
    names = stage_source(root, source, repo)
    missing = [name for name in NOTEBOOKS if name not in names]
    if missing:
        print(f"[segx-book] not executed, left out: {', '.join(missing)} (run `make tutorial` for every notebook)")
    prepare_folder(html)
    done = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-d", str(out / "doctrees"),
                           str(source), str(html)], capture_output=True, text=True)
    if done.returncode != 0:
        raise BookError(f"sphinx failed ({done.returncode}):\n{done.stderr[-4000:]}")
    if done.stderr.strip():
        print(done.stderr.strip(), file=sys.stderr)
    remote = remote_resources(html)
    if remote:
        raise BookError("the site would load from the network:\n" + "\n".join(remote[:20]))
    return html / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segx_helpers.cli.book",
                                     description="Build the tutorial's executed notebooks into a static site.")
    parser.add_argument("--root", default=str(REPO_ROOT), help="the folder whose outputs/notebooks/ make tutorial wrote")
    parser.add_argument("--out", help="where to write source/ and html/ (default: <root>/outputs/book)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        index = build_book(args.root, args.out)
    except BookError as err:
        print(f"[segx-book] {err}", file=sys.stderr)
        return 1
    print(f"[segx-book] built in {time.perf_counter() - started:.0f} s; open {index.as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
