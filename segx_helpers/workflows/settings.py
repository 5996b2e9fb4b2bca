"""Small helpers the notebooks share: where files live (``ROOT``, on Colab too), what to run or prepare when
something is missing, the run mode (quick or full, :class:`RunSettings`), and the Colab setup cell.

The repository URL lives here and only here; the notebooks' Colab badges, setup cells and links to the docs are
checked against it (docs/colab.md, "Publishing").
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_URL = "https://github.com/segx-tutorials/segx-tutorials"
COLAB_FOLDER = "segx-tutorials"
"""The folder that holds ``data/``, ``artifacts/`` and ``outputs/`` on Colab: in the working directory (``/content``
there), or in ``MyDrive`` with ``GOOGLE_DRIVE = True``."""
NOTEBOOKS = (
    "01_dataset_prep", "02_train_segmenter", "03_train_classifier", "04_segx_maps", "05_segu_analysis",
    "06_adapt_new_modality", "07_train_with_the_mask", "08_from_where_to_what",
)


def colab_badge(notebook: str) -> str:
    """Markdown for the "Open in Colab" badge of ``notebooks/<notebook>.ipynb``."""
    repo = REPO_URL.removeprefix("https://github.com/")
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{repo}/blob/main/notebooks/{notebook}.ipynb)")


def docs_url(page: str) -> str:
    """The web address of ``page`` in the repository (e.g. ``"docs/NOTES.md"``): how notebooks link to the docs,
    which a notebook opened on Colab has no copy of."""
    return f"{REPO_URL}/blob/main/{page}"


def colab_setup_source() -> str:
    """Source of every notebook's first code cell: on Colab only, install this package (its required dependencies
    are what the notebooks import, so none of Colab's pinned packages changes); elsewhere do nothing."""
    return (
        "# Colab only: install the helper package from the repository (does nothing anywhere else).\n"
        "import sys\n"
        "\n"
        "if \"google.colab\" in sys.modules:\n"
        "    import subprocess\n"
        "\n"
        f"    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", \"git+{REPO_URL}\"], check=True)"
    )


@dataclass(frozen=True)
class TutorialPaths:
    """Where the tutorial keeps data, trained models and results (all relative to one root).

    ``data/<name>/`` datasets (notebook 01; real datasets converted by ``data_download.sh`` sit in
    ``data/<name>/dataset/`` next to their ``raw/`` download), ``artifacts/<name>/`` checkpoints
    (02, 03, 07), ``outputs/<name>/`` maps, scores and figures (04, 05, 06).
    """

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "TutorialPaths":
        return cls(Path(root).resolve())

    def dataset(self, name: str) -> Path:
        converted = self.root / "data" / name / "dataset"
        return converted if converted.is_dir() else self.root / "data" / name

    def artifacts(self, name: str) -> Path:
        """``artifacts/<name>/``: the dataset's checkpoints."""
        return self.root / "artifacts" / name

    def fixes(self, name: str) -> Path:
        """``artifacts/<name>/fix/``: notebook 07's classifiers trained with the mask."""
        return self.artifacts(name) / "fix"

    def segmenter(self, name: str) -> Path:
        return self.artifacts(name) / "segmenter.pt"

    def classifier(self, name: str) -> Path:
        return self.artifacts(name) / "classifier.pt"

    def outputs(self, name: str) -> Path:
        return self.root / "outputs" / name

    def figures(self, name: str) -> Path:
        return self.outputs(name) / "figures"

    def maps(self, name: str) -> Path:
        return self.outputs(name) / "maps"

    def segu(self, name: str) -> Path:
        return self.outputs(name) / "segu"


def on_colab() -> bool:
    """True inside a Google Colab runtime (its kernel imports ``google.colab`` at start)."""
    return "google.colab" in sys.modules


def default_root(cwd: str | Path | None = None) -> tuple[Path, str]:
    """Where ``ROOT = None`` puts data, checkpoints and results, and why (one phrase).

    On Colab: ``<working directory>/segx-tutorials`` (``/content/segx-tutorials``, where Colab's file browser
    looks; it lasts as long as the runtime). Elsewhere: the folder above the notebook's working directory, which
    in a checkout (notebooks run in ``notebooks/``) is the repository root."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if on_colab():
        return (cwd / COLAB_FOLDER).resolve(), ("on Colab: a folder in the working directory that lasts as long as "
                                                "this runtime; GOOGLE_DRIVE = True keeps it in your Google Drive")
    return cwd.resolve().parent, "the folder above the notebook's, the repository root in a checkout"


def mount_google_drive(cwd: str | Path | None = None) -> Path:
    """Mount Google Drive (Colab asks for access) at ``<working directory>/drive`` and return
    ``MyDrive/segx-tutorials`` in it, the ``ROOT`` that every notebook of the series finds again on a new runtime."""
    if not on_colab():
        raise RuntimeError("GOOGLE_DRIVE = True works on Colab only (it mounts Google Drive); elsewhere set ROOT to "
                           "a folder instead")
    from google.colab import drive  # exists on Colab only

    mountpoint = (Path.cwd() if cwd is None else Path(cwd)) / "drive"
    drive.mount(str(mountpoint))
    return mountpoint / "MyDrive" / COLAB_FOLDER


def tutorial_paths(root: str | Path | None = None, google_drive: bool = False) -> TutorialPaths:
    """The notebooks' ``ROOT`` and ``GOOGLE_DRIVE`` parameters as :class:`TutorialPaths`; prints where ROOT is.

    ``root`` given (a folder, e.g. injected by the runner): that folder. ``None``: :func:`default_root`.
    ``google_drive=True`` (Colab only): :func:`mount_google_drive`, so that the next notebook, opened on a new
    runtime, finds this one's results."""
    if root is not None and google_drive:
        raise ValueError("set either ROOT (a folder) or GOOGLE_DRIVE = True (Colab: ROOT in your Google Drive), "
                         "not both")
    if root is not None:
        folder, why = Path(root).resolve(), "as set"
    elif google_drive:
        folder, why = mount_google_drive(), "in your Google Drive: the next notebooks find these results there"
    else:
        folder, why = default_root()
    folder.mkdir(parents=True, exist_ok=True)
    print(f"ROOT: {folder} ({why})")
    return TutorialPaths(folder)


def resolve_prepare_missing(prepare_missing: bool | None) -> bool:
    """The notebooks' ``PREPARE_MISSING`` as a boolean: ``None`` (the default) means yes on Colab, where each
    notebook opens on a fresh runtime without the earlier notebooks' results, and no elsewhere (a missing result
    then stops with the notebook to run). Prints one line when it prepares."""
    if prepare_missing is None:
        prepare_missing = on_colab()
        if prepare_missing:
            print("PREPARE_MISSING = None on Colab: whatever earlier notebooks would have left under ROOT and is "
                  "missing is prepared here first, each step printed")
    return bool(prepare_missing)


class MissingArtifactError(FileNotFoundError):
    """An earlier notebook's output is missing; the message says which notebook makes it."""


def require(path: str | Path, made_by: str) -> Path:
    """Return ``path`` if it exists, else raise :class:`MissingArtifactError` saying what makes it: ``made_by`` is
    a notebook (``"01_dataset_prep"``) or a command or call that makes it."""
    path = Path(path)
    if path.exists():
        return path
    if made_by[:2].isdigit():
        raise MissingArtifactError(
            f"{path} is missing. Run notebook {made_by} first (or set PREPARE_MISSING = True in the parameters cell "
            "to prepare it here, in this notebook's mode).")
    raise MissingArtifactError(f"{path} is missing. Make it first: {made_by}")


def resolve_quick(quick: bool | None, device: str | None = None) -> bool:
    """The notebooks' ``QUICK`` parameter as a boolean: ``None`` (the default) means quick on a CPU, full on a GPU.

    Prints one line saying which mode was chosen and why. ``True``/``False`` are kept as given (``make tutorial``
    and CI inject ``QUICK = True``). ``device`` overrides the detected device type (``"cuda"``, ``"mps"``, ``"cpu"``).
    """
    if quick is not None:
        quick = bool(quick)
        print(f"mode: {'quick' if quick else 'full'} (QUICK = {quick} was set explicitly)")
        return quick
    if device is None:
        from segx_helpers.models.networks import pick_device  # lazy: settings (make book, the runner) load no torch

        device = pick_device().type
    quick = device == "cpu"
    why = ("no GPU found, so the small settings that finish in minutes on a CPU" if quick
           else f"a GPU ({device}) is available, so the full settings")
    print(f"mode: {'quick' if quick else 'full'} (QUICK = None: {why}; set QUICK = True or False to choose)")
    return quick


@dataclass(frozen=True)
class RunSettings:
    """How much work each notebook does. :data:`QUICK_MODE` is what CI and ``make tutorial`` run on 2 CPU cores
    (the notebooks' ``QUICK = True``); :data:`FULL_MODE` is for a real run (a GPU or patience).

    ``seg_image_size`` is the segmenter's input size: quick mode segments at half resolution (the
    clinical regions are large blobs) and upsamples the probabilities, which makes it 4x cheaper.
    ``cpu_bf16``: train with bfloat16 autocast on a CPU that computes it natively (``TrainConfig.cpu_bf16``), faster
    there (``make benchmark-training``; docs/NOTES.md has the numbers); a CPU without it trains in float32, and a GPU
    ignores it.
    ``cpu_fast_kernels`` (``TrainConfig.cpu_fast_kernels``, the notebooks' ``CPU_FAST_KERNELS``): faster CPU training
    whose results differ from the published ones by rounding; off unless asked for. ``name``: ``"quick"`` or
    ``"full"`` (the mode a notebook prints), ``"custom"`` for settings made by hand.
    """

    n_images: int
    image_size: int
    seg_image_size: int
    seg_epochs: int
    cls_epochs: int
    max_batches_per_epoch: int | None
    shap_images: int
    shap_nsamples: int
    shap_background: int
    bootstrap: int
    cpu_bf16: bool = True
    cpu_fast_kernels: bool = False
    name: str = "custom"
    real_data: bool = False


REAL_DATA_SEG_IMAGE_SIZE = 128
"""The segmenter's input size on real data whatever the classifier's: lesions and lungs are large regions, and its
probabilities are upsampled to the classifier's size (at 256 px a U-Net at 128 px trains 4x faster)."""

QUICK_MODE = RunSettings(n_images=1000, image_size=128, seg_image_size=64, seg_epochs=3, cls_epochs=3, max_batches_per_epoch=12,
                         shap_images=48, shap_nsamples=16, shap_background=16, bootstrap=200, name="quick")
FULL_MODE = RunSettings(n_images=1000, image_size=128, seg_image_size=128, seg_epochs=15, cls_epochs=15, max_batches_per_epoch=None,
                        shap_images=200, shap_nsamples=50, shap_background=50, bootstrap=1000, name="full")


def real_data_size(real_data: bool | int | None) -> int | None:
    """The image size a notebook's ``REAL_DATA`` asks for: ``None`` for ``False``/``None`` (the embedded data), 256 for
    ``True`` (the paper's size), or the size itself (a multiple of 32, at least 32); a ``ValueError`` naming the value
    otherwise (e.g. ``REAL_DATA = 100``)."""
    if real_data is None or real_data is False:
        return None
    if real_data is True:
        return 256
    if isinstance(real_data, int) and real_data >= 32 and real_data % 32 == 0:
        return real_data
    raise ValueError(f"REAL_DATA must be False, True (256 px) or an image size that is a multiple of 32, "
                     f"got {real_data!r}")


def run_settings(quick: bool, real_data: bool | int = False, cpu_fast_kernels: bool = False) -> RunSettings:
    """:data:`QUICK_MODE` (``quick=True``) or :data:`FULL_MODE`; ``real_data=True`` switches to the paper's full image
    size (256 px) for the classifier, for datasets fetched by ``data_download.sh``, with the segmenter at
    :data:`REAL_DATA_SEG_IMAGE_SIZE` (or the classifier's size when smaller), and the real-data classifier recipe
    in notebook 03. ``real_data`` may also be an image size in pixels (a multiple of 32, e.g. 128 for a CPU run, 64
    for a test on a tiny copy), which every notebook then uses alike (``-p REAL_DATA=128`` with the runner).
    ``cpu_fast_kernels``: see :class:`RunSettings` (``-p CPU_FAST_KERNELS=True``)."""
    settings = dataclasses.replace(QUICK_MODE if quick else FULL_MODE, cpu_fast_kernels=bool(cpu_fast_kernels))
    size = real_data_size(real_data)
    if size is None:
        return settings
    return dataclasses.replace(settings, image_size=size, seg_image_size=min(size, REAL_DATA_SEG_IMAGE_SIZE),
                               real_data=True)


def with_image_size(settings: RunSettings, image_size: int | None) -> RunSettings:
    """``settings`` at another image size (notebook 06's ``IMAGE_SIZE``): the classifier's input becomes
    ``image_size`` and the segmenter's is capped at it; ``None`` keeps ``settings``. The size must be a multiple of
    32 (the U-Net halves it five times)."""
    if image_size is None:
        return settings
    if image_size % 32 != 0:
        raise ValueError(f"IMAGE_SIZE must be a multiple of 32 (the U-Net halves it five times), got {image_size}")
    return dataclasses.replace(settings, image_size=image_size, seg_image_size=min(settings.seg_image_size, image_size))
