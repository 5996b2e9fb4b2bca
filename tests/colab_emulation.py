"""Google Colab, emulated on this machine: a fresh runtime per notebook, as a learner gets one.

Colab opens a notebook from GitHub in a new runtime: the working directory (``/content`` there) holds nothing of
the repository, the kernel has imported ``google.colab``, torch and the other large libraries are preinstalled,
and the kernel's own packages are pinned by Colab's ``google-colab`` package (``tests/colab_pins.txt``). Here:

- :func:`build_env` makes the emulated runtime's Python once (``make colab-env``, cached with a stamp like
  ``.venv``): a virtual environment holding exactly the ``[kernel]`` pins and a stand-in ``google-colab``
  distribution (``google.colab`` with a ``drive.mount`` that links a local folder as ``MyDrive``) that requires
  them, so that pip reports a change to them as Colab's pip does. Everything else, torch included, comes from the
  project's ``.venv`` through a ``.pth`` file processed *after* the environment's own site-packages (a folder of
  links to that ``.venv``'s packages, without segx_helpers itself and without papermill, which Colab lacks): pip
  sees torch as installed and never downloads it.
- :func:`run_on_fresh_runtime` runs one notebook the way a learner does: a new folder holding only the notebook, a
  fresh copy of that environment, a kernel that imports ``google.colab`` at start (an IPython startup file) and
  the setup cell's install URL replaced by ``git+file://`` of a local bare clone (the one edit).

``python tests/colab_emulation.py build-env ENV BASE_VENV`` builds the environment (what ``make colab-env`` runs);
``python tests/colab_emulation.py series ENV OUT`` runs notebooks 01 to 07 one after another, each on its own fresh
runtime with ROOT persisted in the emulated Google Drive (``GOOGLE_DRIVE = True``), and prints their times.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
PINS = Path(__file__).with_name("colab_pins.txt")
KERNEL_NAME = "colab-emulated"
STAMP = ".built"
MARKER = ".colab-emulation"
COLAB_REQUIRES = ("ipykernel", "ipython", "notebook", "tornado")
"""The pins Colab's own ``google-colab`` package declares (the stand-in declares the same, from colab_pins.txt)."""
NOT_ON_COLAB = ("segx_helpers", "__editable__", "papermill")
"""Entries of the project's .venv the emulated runtime must not see: the package under test (the setup cell
installs it) and papermill, which Colab does not have (a notebook must not rely on it)."""
RESOLVER_ERROR = "ERROR: pip's dependency resolver"


def read_pins(path: Path = PINS) -> dict[str, dict[str, str]]:
    """``tests/colab_pins.txt`` as ``{section: {distribution name: version}}`` (``kernel``, ``preinstalled``)."""
    pins: dict[str, dict[str, str]] = {}
    section = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = pins.setdefault(line[1:-1], {})
        elif section is None or "==" not in line:
            raise ValueError(f"{path}:{number}: expected [section] or name==version, got {raw!r}")
        else:
            name, version = (part.strip() for part in line.split("==", 1))
            section[name.lower()] = version
    return pins


STUB_INIT = '''"""Stand-in for Colab's ``google.colab`` (the Colab emulation of segx-tutorials' tests): importing it is how
code tells it runs on Colab."""
'''
STUB_DRIVE = '''"""Stand-in for ``google.colab.drive``: ``mount`` links the folder named by $COLAB_EMULATION_DRIVE (the
emulated learner's Google Drive, which outlives each runtime) as ``<mountpoint>/MyDrive``."""
import os
from pathlib import Path


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    drive = os.environ.get("COLAB_EMULATION_DRIVE")
    if not drive:
        raise ValueError("this emulated runtime has no Google Drive (set COLAB_EMULATION_DRIVE)")
    Path(drive).mkdir(parents=True, exist_ok=True)
    mine = Path(mountpoint) / "MyDrive"
    mine.parent.mkdir(parents=True, exist_ok=True)
    if not mine.exists():
        mine.symlink_to(drive, target_is_directory=True)
    print(f"Mounted at {mountpoint}")
'''


def site_packages(env: Path) -> Path:
    """The ``site-packages`` folder of the virtual environment ``env``."""
    found = sorted(env.glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise FileNotFoundError(f"{env} is not a virtual environment with one site-packages folder")
    return found[0]


def write_stub(site: Path, pins: dict[str, str]) -> None:
    """Install the stand-in ``google-colab`` 1.0.0 into ``site`` by hand (a dist-info folder and the
    ``google.colab`` files, no build step), requiring the kernel pins Colab's own package requires."""
    package = site / "google" / "colab"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(STUB_INIT)
    (package / "drive.py").write_text(STUB_DRIVE)
    info = site / "google_colab-1.0.0.dist-info"
    info.mkdir(exist_ok=True)
    requires = "".join(f"Requires-Dist: {name}=={pins[name]}\n" for name in COLAB_REQUIRES)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: google-colab\nVersion: 1.0.0\n{requires}")
    (info / "INSTALLER").write_text("colab-emulation\n")
    (info / "top_level.txt").write_text("google\n")
    files = ["google/colab/__init__.py", "google/colab/drive.py", *(f"{info.name}/{n}" for n in
                                                                   ("METADATA", "INSTALLER", "top_level.txt", "RECORD"))]
    (info / "RECORD").write_text("".join(f"{name},,\n" for name in files))


def link_preinstalled(base_site: Path, folder: Path) -> int:
    """Fill ``folder`` with links to every entry of ``base_site`` the emulated runtime may see; returns how many."""
    folder.mkdir()
    count = 0
    for entry in sorted(base_site.iterdir()):
        if entry.name.startswith(NOT_ON_COLAB) or entry.suffix == ".pth":
            continue
        (folder / entry.name).symlink_to(entry)
        count += 1
    return count


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def build_env(env: Path, base_venv: Path) -> None:
    """Create the emulated runtime's environment ``env`` on top of ``base_venv`` (see the module's docstring).

    Refuses to replace an ``env`` it did not build. Checks at the end that pip sees torch as installed and that the
    kernel pins are the installed versions."""
    env, base_venv = env.resolve(), base_venv.resolve()
    if env.exists():
        if not (env / MARKER).is_file():
            raise FileExistsError(f"{env} exists and was not built by tests/colab_emulation.py; remove it yourself")
        shutil.rmtree(env)
    subprocess.run([str(env_python(base_venv)), "-m", "venv", str(env)], check=True)
    (env / MARKER).write_text("built by tests/colab_emulation.py (make colab-env); safe to delete\n")
    site = site_packages(env)
    count = link_preinstalled(site_packages(base_venv), env / "preinstalled")
    (site / "zz-colab-preinstalled.pth").write_text(f"{env / 'preinstalled'}\n")  # after site-packages itself
    pins = read_pins()
    kernel = [f"{name}=={version}" for name, version in pins["kernel"].items()]
    subprocess.run([str(env_python(env)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *kernel],
                   check=True)
    write_stub(site, pins["kernel"])
    listed = installed_versions(env)
    if "torch" not in listed:
        raise RuntimeError(f"pip in {env} does not see torch from {base_venv}: the .pth link to its packages failed")
    changed = {name: listed.get(name) for name, version in pins["kernel"].items() if listed.get(name) != version}
    if changed:
        raise RuntimeError(f"the kernel pins did not install as pinned: {changed}")
    (env / STAMP).write_text(json.dumps({"base_venv": str(base_venv), "linked_entries": count, "pins": pins}) + "\n")
    print(f"colab emulation environment ready: {env} ({count} entries of {base_venv} visible, pins {kernel})")


def installed_versions(env: Path) -> dict[str, str]:
    """Every distribution pip sees in ``env``, lower-case name -> version (as ``pip list`` reports them)."""
    done = subprocess.run([str(env_python(env)), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                          check=True, capture_output=True, text=True)
    return {row["name"].lower().replace("_", "-"): row["version"] for row in json.loads(done.stdout)}


def fresh_runtime_env(env: Path, copy: Path) -> Path:
    """A pristine copy of the built environment ``env`` at ``copy`` (each runtime installs into its own)."""
    if not (env / STAMP).is_file():
        raise FileNotFoundError(f"{env} is not a built Colab emulation environment: run make colab-env")
    shutil.copytree(env, copy, symlinks=True)
    return copy


def kernel_spec(folder: Path, env: Path, ipython_dir: Path, extra_env: dict[str, str]) -> Path:
    """Write a kernelspec ``colab-emulated`` under ``folder/kernels`` (for ``JUPYTER_PATH``) that starts
    ``env``'s Python with an IPython startup file importing ``google.colab``, as Colab's kernel has it."""
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-google-colab.py").write_text("import google.colab  # noqa: F401 (Colab's kernel imports it)\n")
    spec_dir = folder / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    environment = {"IPYTHONDIR": str(ipython_dir), "PYTHONPATH": "", "VIRTUAL_ENV": str(env),
                   "MPLBACKEND": "module://matplotlib_inline.backend_inline", **extra_env}
    spec = {"argv": [str(env_python(env)), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Colab (emulated)", "language": "python", "env": environment}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return folder


def setup_url_edit(notebook: nbformat.NotebookNode, bare_clone: Path) -> nbformat.NotebookNode:
    """The one edit: the setup cell installs from ``git+file://<bare_clone>`` instead of the public repository."""
    from segx_helpers.workflows.settings import REPO_URL

    setup = next(cell for cell in notebook.cells if cell.cell_type == "code")
    if setup.source.count(f"git+{REPO_URL}") != 1:
        raise ValueError(f"the first code cell does not install git+{REPO_URL} once: {setup.source!r}")
    setup.source = setup.source.replace(f"git+{REPO_URL}", f"git+file://{bare_clone}")
    return notebook


def bare_clone(repository: Path, target: Path) -> Path:
    """``git clone --bare`` of ``repository``'s HEAD (committed work only, as a learner would install it)."""
    subprocess.run(["git", "clone", "--quiet", "--bare", str(repository), str(target)], check=True)
    return target


@dataclass(frozen=True)
class RuntimeRun:
    """What one notebook did on its fresh emulated runtime: the working directory (Colab's ``/content``), the
    executed notebook, its wall-clock seconds, the setup cell's text output (pip's) and the environment's
    installed versions after the run."""

    workdir: Path
    notebook: nbformat.NotebookNode
    seconds: float
    setup_output: str
    versions_after: dict[str, str]

    def text(self) -> str:
        """Everything the notebook printed or displayed as text."""
        parts = []
        for cell in self.notebook.cells:
            for out in cell.get("outputs", []):
                parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
        return "\n".join(parts)


def cell_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []))


@dataclass(frozen=True)
class Emulation:
    """What every emulated runtime shares: the built environment ``env`` (each runtime gets a fresh copy), the bare
    clone the setup cell installs from, and ``drive``, the folder the stand-in ``drive.mount`` links as ``MyDrive``
    (the learner's Google Drive, which outlives runtimes); with a ``drive`` the notebooks run with
    ``GOOGLE_DRIVE = True``, the learner's own edit when following docs/colab.md's "keep your work" step."""

    env: Path
    clone: Path
    drive: Path | None = None


def google_drive_edit(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The parameters cell's ``GOOGLE_DRIVE = False`` set to True."""
    params = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    if "GOOGLE_DRIVE = False" not in params.source:
        raise ValueError("the parameters cell has no GOOGLE_DRIVE = False line")
    params.source = params.source.replace("GOOGLE_DRIVE = False", "GOOGLE_DRIVE = True", 1)
    return notebook


def run_on_fresh_runtime(name: str, emulation: Emulation, scratch: Path, timeout: int = 1800) -> RuntimeRun:
    """Run ``notebooks/<name>.ipynb`` on a fresh emulated Colab runtime under ``scratch`` (created; must not
    exist): ``scratch/content`` holds only the notebook and is the working directory, the environment is a fresh
    copy of ``emulation.env``, torch runs on one thread. Raises nbclient's ``CellExecutionError`` if a cell fails;
    the executed notebook is written to ``scratch/<name>.executed.ipynb`` either way."""
    from nbclient import NotebookClient

    scratch.mkdir(parents=True)
    workdir = scratch / "content"
    workdir.mkdir()
    shutil.copy(REPO / "notebooks" / f"{name}.ipynb", workdir / f"{name}.ipynb")
    runtime_env = fresh_runtime_env(emulation.env, scratch / "runtime-env")
    extra = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    notebook = setup_url_edit(nbformat.read(workdir / f"{name}.ipynb", as_version=4), emulation.clone)
    if emulation.drive is not None:
        extra["COLAB_EMULATION_DRIVE"] = str(emulation.drive)
        notebook = google_drive_edit(notebook)
    jupyter_path = kernel_spec(scratch / "jupyter", runtime_env, scratch / "ipython", extra)
    previous = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(jupyter_path)
    started = time.perf_counter()
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name=KERNEL_NAME,
                       resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        nbformat.write(notebook, scratch / f"{name}.executed.ipynb")
        if previous is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = previous
    seconds = time.perf_counter() - started
    setup = next(cell for cell in notebook.cells if cell.cell_type == "code")
    return RuntimeRun(workdir, notebook, seconds, cell_text(setup), installed_versions(runtime_env))


def pins_changed(versions: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """The ``[kernel]`` pins whose installed version differs: name -> (pinned, installed)."""
    pinned = read_pins()["kernel"]
    return {name: (version, versions.get(name)) for name, version in pinned.items() if versions.get(name) != version}


def run_series(env: Path, out: Path, names: list[str]) -> dict[str, float]:
    """Notebooks ``names`` one after another under ``out`` (created; must not exist), each on its own fresh runtime,
    with ROOT in the emulated Google Drive ``out/drive`` so that each finds the earlier ones' results. Returns
    seconds per notebook and prints a line per notebook as it finishes."""
    out.mkdir(parents=True)
    emulation = Emulation(env.resolve(), bare_clone(REPO, out / "segx-tutorials.git"), out / "drive")
    times = {}
    for name in names:
        run = run_on_fresh_runtime(name, emulation, out / name)
        times[name] = round(run.seconds, 1)
        print(f"{name}: {times[name]:.0f} s; pip resolver error: {RESOLVER_ERROR in run.setup_output}; "
              f"kernel pins changed: {pins_changed(run.versions_after) or 'none'}", flush=True)
        shutil.rmtree(out / name / "runtime-env")  # the runtime ends; what it wrote to the Drive stays
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/colab_emulation.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-env", help="build the emulated runtime's environment (make colab-env)")
    build.add_argument("env", type=Path)
    build.add_argument("base_venv", type=Path, help="the project's .venv, whose packages the runtime sees")
    series = sub.add_parser("series", help="notebooks one after another, each on a fresh runtime, ROOT in Drive")
    series.add_argument("env", type=Path)
    series.add_argument("out", type=Path, help="a new folder for the runtimes and the emulated Drive")
    series.add_argument("--only", nargs="+", help="these notebooks (default: all)")
    args = parser.parse_args(argv)
    if args.command == "build-env":
        build_env(args.env, args.base_venv)
        return 0
    from segx_helpers.workflows.settings import NOTEBOOKS

    times = run_series(args.env, args.out, args.only or list(NOTEBOOKS))
    print(json.dumps(times, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
