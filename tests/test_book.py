"""The book (``make book``, segx_helpers.cli.book): staged pages, run headers, and the built site in headless Chromium.

The site is built once per module from a small executed fixture made here: two tutorial notebooks with a
picture output each (written with nbformat, as papermill leaves them; no kernel runs), a run record in
timings.json, and a README and NOTES with a picture of their own. The real tutorial is not run.
"""
from __future__ import annotations

import base64
import io
import json

import matplotlib.pyplot as plt
import nbformat
import pytest

from segx_helpers.cli.book import (BADGE_FILE, WIDGET_NOTE, BookError, build_book, executed_notebooks, prepare_folder,
                               remote_resources, run_header, with_run_header)
from segx_helpers.workflows.settings import colab_badge
from test_browser import browser  # noqa: F401  (the browser test's headless Chromium, started the same way)

NAMES = ("01_dataset_prep", "02_train_segmenter")
RECORD = {"seconds": 75.2, "mode": "quick", "device": "cpu", "started": "2026-12-04T11:00:00+00:00",
          "commit": "abc1234567", "parameters": {"DATASET": "synthetic-derm"}}


def _png(color: str) -> bytes:
    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
    ax.plot([0, 1], [0, 1], color=color)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


MACHINE = "/home/builder/segx-run"
"""The fixture notebooks' run folder, as papermill injected it and outputs printed it (the book's own root is
another: both must be absent from the site)."""


def _executed_notebook(name: str, root: str = MACHINE) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    picture = nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(_png("red")).decode(),
                                                           "text/plain": "<Figure>"})
    injected = nbformat.v4.new_code_cell(f"# Parameters\nQUICK = True\nROOT = \"{root}\"\n", execution_count=2,
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}\n\n{colab_badge(name)}\n\nWhat this notebook does."),
                nbformat.v4.new_code_cell('ROOT = ".."', execution_count=1, metadata={"tags": ["parameters"]}),
                injected,
                nbformat.v4.new_markdown_cell("The score: $$c_{IoU} = \\frac{|a \\cap b|}{|a \\cup b|}$$ and $x^2$."),
                nbformat.v4.new_code_cell("print(paths.root)", execution_count=3,
                                          outputs=[nbformat.v4.new_output("stream", name="stdout",
                                                                          text=f"written to {root}/outputs/x\n")]),
                nbformat.v4.new_code_cell("show_figure()", execution_count=1,
                                          outputs=[picture, nbformat.v4.new_output("stream", name="stdout", text="ok\n")]),
                nbformat.v4.new_code_cell("explorer()", execution_count=2, outputs=[nbformat.v4.new_output(
                    "display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "a1", "version_major": 2,
                                                                                       "version_minor": 0},
                                          "text/plain": "VBox(children=(Dropdown(),))"})])]
    return nb


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """(root, index.html) of a book built from two executed fixture notebooks and a fixture README/NOTES."""
    pytest.importorskip("myst_nb", reason="the book needs the docs extra (pip install -e '.[docs]')")
    root = tmp_path_factory.mktemp("book")
    notebooks = root / "outputs" / "notebooks"
    notebooks.mkdir(parents=True)
    for name in NAMES:
        nbformat.write(_executed_notebook(name, str(root.resolve())), notebooks / f"{name}.ipynb")
    (root / "outputs" / "timings.json").write_text(json.dumps({NAMES[0]: RECORD}))
    repo = root / "repo"
    (repo / "docs" / "figures").mkdir(parents=True)
    (repo / "docs" / "figures" / "gallery.png").write_bytes(_png("blue"))
    (repo / "README.md").write_text("# Fixture tutorials\n\n![gallery](docs/figures/gallery.png)\n\n"
                                    f"Start with [notebook 01](notebooks/{NAMES[0]}.ipynb); see [the notes](docs/NOTES.md).\n")
    (repo / "docs" / "NOTES.md").write_text("# Notes\n\nBack to the [README](../README.md).\n")
    return root, build_book(root, repo=repo)


def test_the_book_has_the_readme_as_index_then_the_notebooks_in_order_then_the_notes(book):
    root, index = book
    html = index.parent
    assert index.name == "index.html" and "Fixture tutorials" in index.read_text()
    for name in NAMES:
        assert (html / "notebooks" / f"{name}.html").is_file()
    assert (html / "docs" / "NOTES.html").is_file()
    text = index.read_text()
    positions = [text.index(f"notebooks/{name}.html") for name in NAMES] + [text.index("docs/NOTES.html")]
    assert positions == sorted(positions)
    assert 'href="../index.html' in (html / "docs" / "NOTES.html").read_text()  # the README link leads home
    assert remote_resources(html) == []


def test_each_notebook_page_starts_with_its_badge_and_how_it_was_run(book):
    _, index = book
    page = (index.parent / "notebooks" / f"{NAMES[0]}.html").read_text()
    badge, header, intro = (page.index(BADGE_FILE.removesuffix(".svg")), page.index("Executed by"),
                            page.index("What this notebook does"))
    assert badge < header < intro
    assert "colab.research.google.com/github/" in page and "colab.research.google.com/assets" not in page
    for fact in ("quick", "cpu", "2026-12-04 11:00:00 UTC", "abc1234567", "1 min 15 s"):
        assert fact in page, fact
    assert "not recorded" in (index.parent / "notebooks" / f"{NAMES[1]}.html").read_text()
    assert WIDGET_NOTE.strip("*") in page and "VBox" not in page


def test_the_site_shows_no_path_of_the_machine_that_ran_the_notebooks(book):
    """papermill's injected-parameters cell (``ROOT = "/abs/path"``) is left out and printed paths of the run's folder
    read ``ROOT/...``: no absolute path of the build machine anywhere in the built site."""
    root, index = book
    html = index.parent
    pages = {page: page.read_text(encoding="utf-8", errors="replace") for page in html.rglob("*") if page.is_file()
             and page.suffix in (".html", ".js", ".txt", ".json")}
    assert [str(page) for page, text in pages.items() if str(root.resolve()) in text or str(root) in text] == []
    page = pages[html / "notebooks" / f"{NAMES[0]}.html"]
    assert "QUICK" not in page  # the injected cell; the notebook's own parameters cell stays
    assert "written to ROOT/outputs/x" in page


def test_without_machine_paths_drops_the_injected_cell_and_writes_root_for_the_run_folder(tmp_path):
    from segx_helpers.cli.book import without_machine_paths

    nb = without_machine_paths(_executed_notebook(NAMES[0], str(tmp_path)), tmp_path)
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert str(tmp_path) not in json.dumps(nb) and "written to ROOT/outputs/x" in json.dumps(nb)
    assert len(nb.cells) == len(_executed_notebook(NAMES[0]).cells) - 1


def test_math_is_rendered_by_the_bundled_mathjax(book):
    """``$...$`` and ``$$...$$`` become math for the MathJax copied into the site (no CDN)."""
    _, index = book
    html = index.parent
    page = (html / "notebooks" / f"{NAMES[0]}.html").read_text()
    assert 'class="math' in page and "\\frac{|a \\cap b|}" in page
    assert "_static/mathjax/tex-chtml.js" in page and (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert remote_resources(html) == []


def test_run_header_and_badge_placement():
    assert run_header(RECORD) == ("> Executed by `make tutorial` (**quick** mode, on **cpu**, started 2026-12-04 "
                                  "11:00:00 UTC, commit `abc1234567`, with `DATASET = 'synthetic-derm'`); "
                                  "it ran in 1 min 15 s.")
    nb = with_run_header(_executed_notebook(NAMES[0]), NAMES[0], RECORD)
    first = nb.cells[0].source
    assert first.startswith(f"# {NAMES[0]}\n\n[![Open In Colab]({BADGE_FILE})]") and "Executed by" in first
    plain = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Title\nText")])
    assert with_run_header(plain, NAMES[0], None).cells[0].source.startswith(f"# Title\n\n[![Open In Colab]({BADGE_FILE})]")


def test_the_book_refuses_without_executed_notebooks_or_over_a_foreign_folder(tmp_path):
    with pytest.raises(BookError, match="run `make tutorial` first"):
        executed_notebooks(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("a user's file")
    with pytest.raises(BookError, match="not made by `make book`"):
        prepare_folder(tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "a user's file"


def test_remote_resources_lists_loads_from_the_network_not_links(tmp_path):
    (tmp_path / "a.html").write_text('<a href="https://example.org">x</a><script src="_static/x.js"></script>'
                                     '<link rel="stylesheet" href="https://cdn.example.org/x.css">'
                                     "<img src='//cdn.example.org/y.png'>")
    assert remote_resources(tmp_path) == ["a.html: <link href> https://cdn.example.org/x.css",
                                          "a.html: <img src> //cdn.example.org/y.png"]



REMOTE_LOADS = """<html><head><style>@import url("https://fonts.example.org/a.css");
@import 'https://cdn.example.org/b.css';</style></head><body>
<div style="background: url(https://cdn.example.org/c.png)">x</div>
<object data="https://cdn.example.org/d.svg"></object><embed src="//cdn.example.org/e.swf">
<img src="local.png" srcset="local-2x.png 2x, https://cdn.example.org/f.png 3x">
<video poster="https://cdn.example.org/g.jpg"></video>
<svg><image href="https://cdn.example.org/h.png"/><image xlink:href="https://cdn.example.org/i.png"/></svg>
<a href="https://example.org/a-link-to-click">not a load</a><img src="data:image/png;base64,AAAA"></body></html>
"""


def test_remote_resources_finds_every_way_a_page_loads_from_the_network(tmp_path):
    """Issue 35 item 8: CSS ``url()`` and ``@import`` (in a style element, a style attribute or a style sheet),
    ``<object data>``, ``<embed>``, ``srcset``, ``poster`` and ``<svg><image>`` are loads too, so a notebook output
    holding one makes ``make book`` fail (before, the site was built with all of them in the page)."""
    (tmp_path / "page.html").write_text(REMOTE_LOADS)
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "theme.css").write_text("body { background: url('img/local.png') }\n"
                                                   "@font-face { src: url(//fonts.example.org/x.woff2) }\n")
    assert remote_resources(tmp_path) == [
        "_static/theme.css: <css url()> //fonts.example.org/x.woff2",
        "page.html: <style @import> https://fonts.example.org/a.css",
        "page.html: <style @import> https://cdn.example.org/b.css",
        "page.html: <div style url()> https://cdn.example.org/c.png",
        "page.html: <object data> https://cdn.example.org/d.svg",
        "page.html: <embed src> //cdn.example.org/e.swf",
        "page.html: <img srcset> https://cdn.example.org/f.png",
        "page.html: <video poster> https://cdn.example.org/g.jpg",
        "page.html: <image href> https://cdn.example.org/h.png",
        "page.html: <image xlink:href> https://cdn.example.org/i.png"]


def test_a_truncated_timings_json_is_one_warning_and_the_pages_say_the_run_is_not_recorded(tmp_path):
    """Issue 35 item 9: a truncated ``outputs/timings.json`` (the runner wrote it in place; now it writes it
    atomically) gives one warning line and no run records, never a JSONDecodeError traceback."""
    from segx_helpers.cli.runner import record_run
    from segx_helpers.workflows.report import RunRecordWarning, read_run_records

    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "timings.json").write_text('{"01_dataset_prep": {"seconds": 75.2, "mo')
    with pytest.warns(RunRecordWarning, match=r"timings.json is not valid JSON .*: the pages say how the notebooks ran "
                                              "only once make tutorial writes it again"):
        assert read_run_records(tmp_path) == {}
    with pytest.warns(RunRecordWarning):
        record_run(tmp_path, NAMES[0], RECORD)  # the runner replaces the damaged file with a complete one
    assert read_run_records(tmp_path) == {NAMES[0]: RECORD}
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["timings.json"]


LOADED = """
const urls = performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))
    .map(e => e.name);
document.querySelectorAll('img, script[src], link[href], iframe, source, video, audio').forEach(e => {
    const url = e.currentSrc || e.src || e.href; if (url) urls.push(url); });
return urls;
"""


def test_the_site_opens_from_disk_with_every_picture_and_no_network_request(book, browser):  # noqa: F811
    from selenium.webdriver.support.ui import WebDriverWait

    _, index = book
    for page in (index, index.parent / "notebooks" / f"{NAMES[0]}.html"):
        browser.get(page.as_uri())
        WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
        pictures = browser.execute_script(
            "return [...document.images].map(i => [i.currentSrc, i.complete && i.naturalWidth > 0]);")
        assert pictures, f"no picture on {page.name}"
        assert [src for src, loaded in pictures if not loaded] == [], f"pictures that did not load on {page.name}"
        urls = browser.execute_script(LOADED)
        assert urls and [u for u in urls if not u.startswith(("file://", "data:", "blob:", "about:"))] == []
    assert any(src.endswith(".png") for src, _ in pictures)  # the notebook's own figure, not just the badge
