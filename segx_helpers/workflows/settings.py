"""Small helpers the notebooks share: where files live, what to run when something is missing,
the run mode (quick or full, :class:`RunSettings`), and the Colab setup cell.

The repository URL lives here and only here; the notebooks' Colab cells are checked against it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

REPO_URL = "https://github.com/segx-tutorials/segx-tutorials"
NOTEBOOKS = (
    "01_dataset_prep", "02_train_segmenter", "03_train_classifier", "04_segx_maps", "05_segu_analysis",
    "06_adapt_new_modality", "07_train_with_the_mask", "08_from_where_to_what",
)


def colab_badge(notebook: str) -> str:
    """Markdown for the "Open in Colab" badge of ``notebooks/<notebook>.ipynb``."""
    repo = REPO_URL.removeprefix("https://github.com/")
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{repo}/blob/main/notebooks/{notebook}.ipynb)")


def colab_setup_source() -> str:
    """Source of every notebook's first code cell: on Colab only, install this package; elsewhere do nothing."""
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


class MissingArtifactError(FileNotFoundError):
    """An earlier notebook's output is missing; the message says which notebook makes it."""


def require(path: str | Path, made_by: str) -> Path:
    """Return ``path`` if it exists, else raise :class:`MissingArtifactError` naming the notebook to run."""
    path = Path(path)
    if not path.exists():
        raise MissingArtifactError(
            f"{path} is missing. Run notebook {made_by} first (or set PREPARE_MISSING = True in the parameters cell "
            "to produce it here in quick mode)."
        )
    return path


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
    ``cpu_bf16``: train with bfloat16 autocast on a CPU that computes it natively (``TrainConfig.cpu_bf16``), about
    twice as fast there (``make benchmark-training``); a CPU without it trains in float32, and a GPU ignores it.
    ``cpu_fast_kernels`` (``TrainConfig.cpu_fast_kernels``, the notebooks' ``CPU_FAST_KERNELS``): faster CPU training
    whose results differ from the published ones by rounding; off unless asked for.
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


QUICK_MODE = RunSettings(n_images=1000, image_size=128, seg_image_size=64, seg_epochs=3, cls_epochs=3, max_batches_per_epoch=12,
                         shap_images=48, shap_nsamples=16, shap_background=16, bootstrap=200)
FULL_MODE = RunSettings(n_images=1000, image_size=128, seg_image_size=128, seg_epochs=15, cls_epochs=15, max_batches_per_epoch=None,
                        shap_images=200, shap_nsamples=50, shap_background=50, bootstrap=1000)


def run_settings(quick: bool, real_data: bool | int = False, cpu_fast_kernels: bool = False) -> RunSettings:
    """:data:`QUICK_MODE` (``quick=True``) or :data:`FULL_MODE`; ``real_data=True`` switches to the paper's full image size (256 px) for
    classifier and segmenter, for datasets fetched by ``data_download.sh``. ``real_data`` may also be an
    image size in pixels (a multiple of 32, e.g. 128 for a CPU run, 64 for a test on a tiny copy), which
    every notebook then uses alike (``-p REAL_DATA=128`` with the runner). ``cpu_fast_kernels``: see
    :class:`RunSettings` (``-p CPU_FAST_KERNELS=True``)."""
    settings = dataclasses.replace(QUICK_MODE if quick else FULL_MODE, cpu_fast_kernels=bool(cpu_fast_kernels))
    if real_data is None or real_data is False:
        return settings
    if real_data is True:
        size = 256
    elif isinstance(real_data, int) and real_data >= 32 and real_data % 32 == 0:
        size = real_data
    else:
        raise ValueError(f"REAL_DATA must be False, True (256 px) or an image size that is a multiple of 32, "
                         f"got {real_data!r}")
    return dataclasses.replace(settings, image_size=size, seg_image_size=size)


def with_image_size(settings: RunSettings, image_size: int | None) -> RunSettings:
    """``settings`` at another image size (notebook 06's ``IMAGE_SIZE``): the classifier's input becomes
    ``image_size`` and the segmenter's is capped at it; ``None`` keeps ``settings``. The size must be a multiple of
    32 (the U-Net halves it five times)."""
    if image_size is None:
        return settings
    if image_size % 32 != 0:
        raise ValueError(f"IMAGE_SIZE must be a multiple of 32 (the U-Net halves it five times), got {image_size}")
    return dataclasses.replace(settings, image_size=image_size, seg_image_size=min(settings.seg_image_size, image_size))
