"""Converters from the raw layouts of public clinical data sets to the package's dataset format.

Each ``convert_<name>(raw_dir, out_dir, seed=0, image_size=None, overwrite=False)`` checks the raw
layout (a missing file or folder raises :class:`DatasetFormatError` naming it), builds the labels
and a 7:1:2 train/val/test split stratified by label and deterministic in ``seed``, and writes the
dataset through :func:`write_dataset` (atomically). ``image_size`` resizes every image (bilinear)
and mask (nearest) to a square of that many pixels; by default the original size is kept.

Real data is user data: its ``dataset.json`` has no ``generator`` entry, so ``write_dataset``
never replaces a converted real dataset, even with ``overwrite=True``. Delete the folder yourself
to convert again.

``data_download.sh`` runs the converters through the command line::

    python -m segx_helpers.data.converters <dataset> <raw_dir> <out_dir> [--seed N] [--image-size N] [--trap-set N]
                                     [--split trap|random]

which first looks for the raw layout in ``raw_dir`` and up to two folder levels below it (archives
often unpack into a folder of their own).

``convert_isic2018_trap`` keeps the published split instead of making one: the "trap" train/val/test
split of Bissoto et al. (2020), where artefacts go with the label in training and against it in test.
It also writes the annotated artefact flags as the dataset's optional ``artefacts.csv``. With
``split="random"`` (``--split random``) it makes a stratified random 7:1:2 split of all annotated images
instead, the baseline beside the trap set.
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from segx_helpers.data.io import check_safe_id
from segx_helpers.data.format import (IMAGE_SUFFIXES, NO_EXTRAS, SPLITS, DatasetExtras, DatasetFormatError, DatasetInfo,
                                      image_mode, make_splits, parse_labels, read_image, read_mask, read_table_csv,
                                      series_bit_depth, write_dataset)

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM_METADATA_FILES = ("HAM10000_metadata.csv", "HAM10000_metadata.tab")
HAM_IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "images")
HAM_MASK_DIRS = ("HAM10000_segmentations_lesion_tschandl", "ISIC2018_Task1_Training_GroundTruth", "masks")

CHESTX_DET10_CLASSES = ("Atelectasis", "Calcification", "Consolidation", "Effusion", "Emphysema", "Fibrosis",
                        "Fracture", "Mass", "Nodule", "Pneumothorax")
CHESTX_DET10_JSON_FILES = ("train.json", "test.json")
CHESTX_DET10_IMAGE_DIRS = ("train", "test", "images")

TB_LABEL = re.compile(r"_([01])$")
NLM_TB_SOURCE = "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets"
NLM_TB_LICENCE = (
    "Released by the U.S. National Library of Medicine for research use; cite Jaeger S. et al., Two public "
    "chest X-ray datasets for computer-aided screening of pulmonary diseases, Quant Imaging Med Surg "
    "4(6):475-477 (2014). Check the source page for the current terms."
)


class MissingMaskWarning(UserWarning):
    """Some images of a real data set have no mask; they are kept without one (the format allows it)."""


@dataclass(frozen=True)
class _Record:
    """One image to convert: its id, its file, and the mask files whose union is its mask (none: no mask)."""

    image_id: str
    image: Path
    masks: tuple[Path, ...] = ()


# ----------------------------------------------------------------------------------------- HAM10000

def convert_ham10000(raw_dir: str | Path, out_dir: str | Path, seed: int = 0, image_size: int | None = None,
                     overwrite: bool = False) -> Path:
    """Convert HAM10000 (7-class dermoscopy) with its lesion masks.

    Expects ``HAM10000_metadata.csv`` (``image_id``, ``dx``, optionally ``lesion_id``), the images
    as ``<image_id>.jpg`` in ``HAM10000_images_part_1/``, ``HAM10000_images_part_2/`` or ``images/``,
    and the masks as ``<image_id>_segmentation.png`` in ``HAM10000_segmentations_lesion_tschandl/``,
    ``ISIC2018_Task1_Training_GroundTruth/`` or ``masks/``. Images of one lesion share a split, so
    no lesion is seen in training and again in testing.
    """
    raw_dir = _existing_dir(raw_dir)
    meta = _read_ham_metadata(raw_dir)
    images = _index_files(_require_any_dir(raw_dir, HAM_IMAGE_DIRS, "image"), IMAGE_SUFFIXES)
    masks = _index_files([raw_dir / d for d in HAM_MASK_DIRS], (".png",), strip="_segmentation")
    _check_all_found(meta["image_id"], images, raw_dir, HAM_IMAGE_DIRS)
    records = [_Record(i, images[i], _as_tuple(masks.get(i))) for i in meta["image_id"]]
    labels = pd.DataFrame({"image_id": meta["image_id"], "label": meta["dx"]})
    info = DatasetInfo(
        name="ham10000",
        modality="dermoscopy",
        task="multiclass",
        class_names=list(HAM_CLASSES),
        mask_description="the skin lesion (HAM10000 lesion segmentations, Tschandl et al. 2020, or ISIC 2018 Task 1)",
        source="https://doi.org/10.7910/DVN/DBW86T",
        licence=(
            "CC BY-NC 4.0 (non-commercial use only); cite Tschandl P. et al., The HAM10000 dataset, Sci Data "
            "5:180161 (2018), and for the lesion masks Tschandl P. et al., Nat Med 26:1229-1234 (2020)."
        ),
        channels=3,
    )
    return _write(out_dir, info, records, labels, _lesion_splits(meta, seed), image_size, overwrite)


def _read_ham_metadata(raw_dir: Path) -> pd.DataFrame:
    path = next((raw_dir / name for name in HAM_METADATA_FILES if (raw_dir / name).is_file()), None)
    if path is None:
        raise DatasetFormatError(
            f"{raw_dir / HAM_METADATA_FILES[0]} not found: the HAM10000 metadata table (columns image_id, dx, "
            "lesion_id) is required."
        )
    try:
        meta = pd.read_csv(path, sep="\t" if path.suffix == ".tab" else ",", dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path} cannot be parsed as a table: {err}") from err
    missing = [c for c in ("image_id", "dx") if c not in meta.columns]
    if missing:
        raise DatasetFormatError(f"{path} lacks the columns {missing} (has {list(meta.columns)}).")
    if meta["image_id"].isna().any():
        raise DatasetFormatError(f"{path}: empty image_id in rows {meta.index[meta['image_id'].isna()].tolist()[:5]}.")
    meta["image_id"] = meta["image_id"].str.strip()
    meta["dx"] = meta["dx"].str.strip().fillna("(empty)")
    duplicated = meta["image_id"][meta["image_id"].duplicated()].tolist()
    if duplicated:
        raise DatasetFormatError(f"{path}: duplicate image ids {duplicated[:5]}.")
    unknown = sorted(set(meta["dx"]) - set(HAM_CLASSES))
    if unknown:
        raise DatasetFormatError(f"{path}: unknown dx values {unknown}; expected one of {list(HAM_CLASSES)}.")
    for image_id in meta["image_id"]:
        _check_id(image_id, path)
    return meta.sort_values("image_id").reset_index(drop=True)


def _lesion_splits(meta: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Split the lesions (stratified by their class), then give every image its lesion's split."""
    if "lesion_id" not in meta.columns:
        return make_splits(meta["image_id"], seed, stratify=meta["dx"])
    lesion = meta["lesion_id"].fillna(meta["image_id"])
    lesion_class = meta.groupby(lesion)["dx"].first()
    lesion_splits = make_splits(lesion_class.index, seed, stratify=lesion_class.to_numpy())
    split_of = dict(zip(lesion_splits["image_id"], lesion_splits["split"]))
    return pd.DataFrame({"image_id": meta["image_id"], "split": lesion.map(split_of).to_numpy()})


# ---------------------------------------------------------------------------- Shenzhen, Montgomery

def convert_shenzhen(raw_dir: str | Path, out_dir: str | Path, seed: int = 0, image_size: int | None = None,
                     overwrite: bool = False) -> Path:
    """Convert the Shenzhen tuberculosis chest X-ray set with its lung masks.

    Expects ``CXR_png/<name>.png`` with ``name`` ending in ``_0`` (normal) or ``_1`` (TB) and the
    lung masks as ``masks/<name>_mask.png`` (or ``masks/<name>.png``). The NLM archive has no
    masks; images without one are kept without a mask.
    """
    raw_dir = _existing_dir(raw_dir)
    images = _tb_images(raw_dir)
    masks = _index_files([raw_dir / "masks"], (".png",), strip="_mask")
    records = [_Record(image_id, path, _as_tuple(masks.get(image_id))) for image_id, path in images]
    info = _tb_info("shenzhen-cxr", "both lung fields (manual lung segmentation)")
    info.licence += " The lung masks are distributed separately (doi:10.17632/8gf9vpkhgy) under their own terms."
    return _write_tb(out_dir, info, records, seed, image_size, overwrite)


def convert_montgomery(raw_dir: str | Path, out_dir: str | Path, seed: int = 0, image_size: int | None = None,
                       overwrite: bool = False) -> Path:
    """Convert the Montgomery County tuberculosis chest X-ray set with its lung masks.

    Expects ``CXR_png/MCUCXR_xxxx_<0|1>.png`` and the per-lung masks of the same name in
    ``ManualMask/leftMask/`` and ``ManualMask/rightMask/``; the mask is their union. An image
    lacking either lung mask is kept without a mask.
    """
    raw_dir = _existing_dir(raw_dir)
    images = _tb_images(raw_dir)
    left, right = (_index_files([_require_dir(raw_dir / "ManualMask" / side)], (".png",))
                   for side in ("leftMask", "rightMask"))
    records = [
        _Record(image_id, path, (left[image_id], right[image_id]) if image_id in left and image_id in right else ())
        for image_id, path in images
    ]
    info = _tb_info("montgomery-cxr", "both lung fields (union of the manual left and right lung masks)")
    return _write_tb(out_dir, info, records, seed, image_size, overwrite)


def _tb_images(raw_dir: Path) -> list[tuple[str, Path]]:
    folder = _require_dir(raw_dir / "CXR_png")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not paths:
        raise DatasetFormatError(f"{folder} holds no PNG images.")
    for path in paths:
        if not TB_LABEL.search(path.stem):
            raise DatasetFormatError(
                f"{path}: cannot read its label: file names in CXR_png must end in _0 (normal) or _1 (tuberculosis)."
            )
    return [(_check_id(p.stem, p), p) for p in paths]


def _tb_info(name: str, mask_description: str) -> DatasetInfo:
    return DatasetInfo(name=name, modality="chest X-ray", task="multilabel", class_names=["tb"],
                       mask_description=mask_description, source=NLM_TB_SOURCE, licence=NLM_TB_LICENCE, channels=1)


def _write_tb(out_dir, info: DatasetInfo, records: list[_Record], seed: int, image_size, overwrite: bool) -> Path:
    ids = [r.image_id for r in records]
    tb = [int(TB_LABEL.search(i).group(1)) for i in ids]
    labels = pd.DataFrame({"image_id": ids, "tb": tb})
    return _write(out_dir, info, records, labels, make_splits(ids, seed, stratify=tb), image_size, overwrite)


# ------------------------------------------------------------------------------------ ChestX-Det10

def convert_chestx_det10(raw_dir: str | Path, out_dir: str | Path, seed: int = 0, image_size: int | None = None,
                         overwrite: bool = False) -> Path:
    """Convert ChestX-Det10 (10 chest X-ray findings, multilabel) and optional lung masks.

    Expects ``train.json`` and/or ``test.json`` (records ``{"file_name", "syms", "boxes"}``; the
    boxes are not used), the images in ``train/``, ``test/`` or ``images/`` and lung masks, where
    available, as ``masks/<stem>.png``. The official train/test division is not kept: all images
    are split 7:1:2, stratified by each image's rarest finding (or "none").
    """
    raw_dir = _existing_dir(raw_dir)
    findings = _read_chestx_annotations(raw_dir)
    images = _index_files(_require_any_dir(raw_dir, CHESTX_DET10_IMAGE_DIRS, "image"), IMAGE_SUFFIXES)
    masks = _index_files([raw_dir / "masks"], (".png",))
    _check_all_found(list(findings), images, raw_dir, CHESTX_DET10_IMAGE_DIRS)
    ids = sorted(findings)
    records = [_Record(i, images[i], _as_tuple(masks.get(i))) for i in ids]
    labels = pd.DataFrame({"image_id": ids})
    for name in CHESTX_DET10_CLASSES:
        labels[name] = [int(name in findings[i]) for i in ids]
    info = DatasetInfo(
        name="chestx-det10",
        modality="chest X-ray",
        task="multilabel",
        class_names=list(CHESTX_DET10_CLASSES),
        mask_description="both lung fields (where lung masks were supplied in masks/)",
        source="https://github.com/Deepwise-AILab/ChestX-Det10-Dataset",
        licence=(
            "Images from NIH ChestX-ray14 (no use restrictions; cite Wang X. et al., CVPR 2017, and acknowledge the "
            "NIH Clinical Center); annotations from ChestX-Det10, cite Liu J. et al., arXiv:2006.10550 (2020). The "
            "annotation repository states no licence: ask the authors before redistributing."
        ),
        channels=1,
    )
    splits = make_splits(ids, seed, stratify=_rarest_finding(labels[list(CHESTX_DET10_CLASSES)]))
    return _write(out_dir, info, records, labels, splits, image_size, overwrite)


def _read_chestx_annotations(raw_dir: Path) -> dict[str, set[str]]:
    """Image id -> set of findings, from every annotation file present."""
    paths = [raw_dir / name for name in CHESTX_DET10_JSON_FILES if (raw_dir / name).is_file()]
    if not paths:
        raise DatasetFormatError(
            f"Neither {raw_dir / 'train.json'} nor {raw_dir / 'test.json'} found: ChestX-Det10 needs its annotation files."
        )
    findings: dict[str, set[str]] = {}
    for path in paths:
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(entries, list):
            raise DatasetFormatError(f"{path} must hold a list of records with file_name and syms.")
        for entry in entries:
            if not isinstance(entry, dict) or "file_name" not in entry or not isinstance(entry.get("syms"), list):
                raise DatasetFormatError(f"{path}: every record needs file_name and a syms list, got {entry!r:.120}.")
            image_id = Path(_check_id(entry["file_name"], path)).stem
            unknown = sorted(set(entry["syms"]) - set(CHESTX_DET10_CLASSES))
            if unknown:
                raise DatasetFormatError(f"{path}: {entry['file_name']} has unknown findings {unknown}.")
            if image_id in findings:
                raise DatasetFormatError(f"{path}: image {entry['file_name']} is annotated more than once.")
            findings[image_id] = set(entry["syms"])
    return findings


def _rarest_finding(onehot: pd.DataFrame) -> np.ndarray:
    """Each image's rarest finding in this data set, or "none": a stratification key that spreads rare findings."""
    ranked = onehot[onehot.sum().sort_values(kind="stable").index]
    return np.where(ranked.any(axis=1), ranked.idxmax(axis=1), "none")


# -------------------------------------------------------------------------- ISIC 2018 + trap sets

ISIC_TRAP_CLASSES = ("benign", "malignant")
ISIC_ARTEFACTS = ("dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches")
ISIC_BIAS_CSV = "isic_bias.csv"
ISIC_TRAP_CSV = "isic_annotated_{split}{n}.csv"
ISIC_TRAP_SETS = (1, 2, 3, 4, 5)
ISIC_SPLITS = ("trap", "random")
ISIC_TRAP_PRECEDENCE = ("test", "val", "train")
ISIC_LAYOUTS = (
    # (layout, image folders, mask folder): the official ISIC 2018 archives, then the komour/diploma copies
    ("ISIC 2018 archives", ("ISIC2018_Task1-2_Training_Input",), "ISIC2018_Task1_Training_GroundTruth"),
    ("komour/diploma 256 px", ("data/train", "data/val", "data/test"), "images/256ISIC2018_Task1_Training_GroundTruth"),
    ("komour/diploma 512 px", ("data512/train", "data512/val", "data512/test"),
     "images/512ISIC2018_Task1_Training_GroundTruth"),
)
ISIC_SOURCE = (
    "ISIC 2018 Task 1 training images and lesion masks (https://challenge.isic-archive.com/data/#2018); artefact "
    "annotations and trap sets of Bissoto et al. 2020 (https://github.com/alceubissoto/debiasing-skin)"
)
ISIC_LICENCE = (
    "ISIC 2018 images and masks: CC BY-NC 4.0 (non-commercial use only); cite Codella N. et al., Skin lesion "
    "analysis toward melanoma detection 2018, arXiv:1902.03368 (2019) and Tschandl P. et al., The HAM10000 "
    "dataset, Sci Data 5:180161 (2018). Artefact annotations and trap sets: cite Bissoto A., Valle E., Avila S., "
    "Debiasing skin lesion datasets and models? Not so fast, CVPR Workshops (ISIC) 2020."
)


def convert_isic2018_trap(raw_dir: str | Path, out_dir: str | Path, trap_set: int = 1, seed: int = 0,
                          image_size: int | None = None, overwrite: bool = False, verbose: bool = True,
                          split: str = "trap") -> Path:
    """Convert ISIC 2018 Task 1 with the benign/malignant labels, artefact flags and trap split of Bissoto et al.

    Expects, in ``raw_dir`` or up to two folder levels below it:

    - ``isic_bias.csv`` (semicolon-separated: ``image;dark_corner;hair;gel_border;gel_bubble;ruler;ink;
      patches;label``, ``label`` 1 = malignant; the image ids may end in ``.png`` or ``.jpg``),
    - the trap set's ``isic_annotated_{train,val,test}<trap_set>.csv`` (comma-separated, same columns plus
      ``vasc``),
    - the images and lesion masks in one of the layouts of :data:`ISIC_LAYOUTS`: the official archives
      (``ISIC2018_Task1-2_Training_Input/ISIC_*.jpg``, ``ISIC2018_Task1_Training_GroundTruth/
      ISIC_*_segmentation.png``) or the komour/diploma copy (``data/{train,val,test}/ISIC_*.jpg``,
      ``images/256ISIC2018_Task1_Training_GroundTruth/ISIC_*_segmentation.png``).

    The dataset is named ``isic2018-trap`` for trap set 1 and ``isic2018-trap<N>`` for the others.
    The split is the trap set's, not a fresh one (``seed`` is unused). With ``split="random"`` the
    dataset is ``isic2018-random``: every image of ``isic_bias.csv``, split 7:1:2 at random, stratified by
    label and deterministic in ``seed`` (the trap files are neither needed nor read, ``trap_set`` is
    unused), with the same labels, masks and ``artefacts.csv``. In a trap split, an image listed in several
    of its files goes to the first of test, val, train (in trap set 1 every val image is also listed in
    train); :func:`isic_trap_splits` reports how many. Labels and artefact flags come from ``isic_bias.csv``;
    a trap file that disagrees with it is an error. The artefact flags are written to the dataset's
    ``artefacts.csv``. Only the images of the trap set (or of ``isic_bias.csv``, random split) are
    converted. The official images are large and not square: pass ``image_size`` (e.g. 256, as
    ``data_download.sh`` does) to resize them.
    """
    if split not in ISIC_SPLITS:
        raise ValueError(f"split must be one of {ISIC_SPLITS}, got {split!r}")
    raw_dir = _existing_dir(raw_dir)
    bias = read_isic_bias(_find_below(raw_dir, ISIC_BIAS_CSV, "the artefact annotations of Bissoto et al."))
    if split == "random":
        splits = make_splits(bias["image_id"], seed, stratify=bias["label"])
        report = (f"stratified random split (seed {seed}) of the {len(splits)} annotated images -> "
                  f"{_split_sizes(splits)}")
        name, described = "isic2018-random", f"stratified random 7:1:2 by label, seed {seed}"
    else:
        splits, report = isic_trap_splits(raw_dir, trap_set, bias)
        name, described = f"isic2018-trap{'' if trap_set == 1 else trap_set}", f"trap set {trap_set}"
    ids = splits["image_id"].tolist()
    layout, image_dirs, mask_dir = _isic_layout(raw_dir)
    images = _index_files(image_dirs, IMAGE_SUFFIXES)
    masks = _index_files([mask_dir], (".png",), strip="_segmentation")
    _check_all_found(ids, images, image_dirs[0].parent, [d.name for d in image_dirs])
    records = [_Record(i, images[i], _as_tuple(masks.get(i))) for i in ids]
    table = bias.set_index("image_id").loc[ids].reset_index()
    labels = pd.DataFrame({"image_id": ids, "label": np.array(ISIC_TRAP_CLASSES)[table["label"].to_numpy()]})
    artefacts = table[["image_id", *ISIC_ARTEFACTS]].astype({a: np.int64 for a in ISIC_ARTEFACTS})
    if verbose:
        print(f"{name}: {layout} in {image_dirs[0].parent}; {report}")
    info = DatasetInfo(
        name=name,
        modality="dermoscopy",
        task="multiclass",
        class_names=list(ISIC_TRAP_CLASSES),
        mask_description="the skin lesion (ISIC 2018 Task 1 expert lesion segmentation)",
        source=f"{ISIC_SOURCE}; split: {described}",
        licence=ISIC_LICENCE,
        channels=3,
    )
    return _write(out_dir, info, records, labels, splits, image_size, overwrite,
                  extras=DatasetExtras(tables=lambda: {"artefacts.csv": artefacts}))


def read_isic_bias(path: str | Path) -> pd.DataFrame:
    """``isic_bias.csv`` as ``image_id`` (without suffix), the seven artefact flags and ``label`` (0/1), sorted."""
    return _read_isic_table(Path(path), sep=";")


def isic_trap_splits(raw_dir: str | Path, trap_set: int = 1, bias: pd.DataFrame | None = None
                     ) -> tuple[pd.DataFrame, str]:
    """The split of one trap set: ``(frame image_id, split; a one-line report of the sizes and overlaps)``.

    Reads ``isic_annotated_{train,val,test}<trap_set>.csv`` from ``raw_dir`` or up to two levels below.
    An image listed in several files goes to the first of test, val, train. With ``bias`` (from
    :func:`read_isic_bias`) every listed image must be annotated there with the same label and flags.
    """
    if trap_set not in ISIC_TRAP_SETS:
        raise ValueError(f"trap_set must be one of {ISIC_TRAP_SETS}, got {trap_set!r}")
    raw_dir = _existing_dir(raw_dir)
    listed = {}
    for split in ISIC_TRAP_PRECEDENCE:
        name = ISIC_TRAP_CSV.format(split=split, n=trap_set)
        path = _find_below(raw_dir, name, f"the {split} list of trap set {trap_set} (Bissoto et al.)")
        listed[split] = _read_isic_table(path, sep=",")
        if bias is not None:
            _check_against_bias(listed[split], bias, path)
    split_of: dict[str, str] = {}
    overlaps = []
    for split in ISIC_TRAP_PRECEDENCE:
        ids = listed[split]["image_id"]
        for other in ISIC_TRAP_PRECEDENCE[:ISIC_TRAP_PRECEDENCE.index(split)]:
            n = sum(split_of.get(i) == other for i in ids)
            if n:
                overlaps.append(f"{n} {split} images also listed in {other}, kept in {other}")
        split_of.update({i: split for i in ids if i not in split_of})
    frame = pd.DataFrame({"image_id": sorted(split_of)})
    frame["split"] = frame["image_id"].map(split_of)
    rows = sum(len(t) for t in listed.values())
    report = (f"trap set {trap_set}: {len(frame)} images ({rows} rows in its lists) -> {_split_sizes(frame)}"
              + (f"; {'; '.join(overlaps)}" if overlaps else "; no image listed twice"))
    return frame, report


def _split_sizes(splits: pd.DataFrame) -> str:
    sizes = splits["split"].value_counts()
    return " / ".join(f"{sizes.get(s, 0)} {s}" for s in ("train", "val", "test"))


def _read_isic_table(path: Path, sep: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep=sep, dtype={"image": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path} cannot be parsed as a table separated by {sep!r}: {err}") from err
    missing = [c for c in ("image", *ISIC_ARTEFACTS, "label") if c not in table.columns]
    if missing:
        raise DatasetFormatError(f"{path} lacks the columns {missing} (has {list(table.columns)}); is it separated "
                                 f"by {sep!r}?")
    if table["image"].isna().any():
        raise DatasetFormatError(f"{path}: empty image names in rows {table.index[table['image'].isna()].tolist()[:5]}.")
    values = table[[*ISIC_ARTEFACTS, "label"]]
    if values.isna().any().any() or not values.isin([0, 1]).all().all():
        bad = table.loc[~values.isin([0, 1]).all(axis=1), "image"].tolist()[:5]
        raise DatasetFormatError(f"{path}: artefact flags and label must be 0 or 1 (rows of {bad}).")
    ids = [_check_id(Path(name.strip()).stem, path) for name in table["image"]]
    out = pd.DataFrame({"image_id": ids, **{c: table[c].astype(np.int64).to_numpy() for c in (*ISIC_ARTEFACTS, "label")}})
    duplicated = out["image_id"][out["image_id"].duplicated()].tolist()
    if duplicated:
        raise DatasetFormatError(f"{path}: duplicate images {duplicated[:5]}.")
    return out.sort_values("image_id").reset_index(drop=True)


def _check_against_bias(listed: pd.DataFrame, bias: pd.DataFrame, path: Path) -> None:
    unknown = sorted(set(listed["image_id"]) - set(bias["image_id"]))
    if unknown:
        raise DatasetFormatError(f"{path}: {len(unknown)} images are not in {ISIC_BIAS_CSV} (e.g. {unknown[:5]}).")
    columns = [*ISIC_ARTEFACTS, "label"]
    expected = bias.set_index("image_id").loc[listed["image_id"], columns].to_numpy()
    differ = (listed[columns].to_numpy() != expected).any(axis=1)
    if differ.any():
        raise DatasetFormatError(f"{path}: labels or artefact flags differ from {ISIC_BIAS_CSV} for "
                                 f"{int(differ.sum())} images (e.g. {listed['image_id'][differ].tolist()[:5]}).")


def _isic_layout(raw_dir: Path) -> tuple[str, list[Path], Path]:
    """The first layout of :data:`ISIC_LAYOUTS` whose image folders are in ``raw_dir`` or up to two levels below."""
    for depth_root in _folders_below(raw_dir, depth=2):
        for layout, image_dirs, mask_dir in ISIC_LAYOUTS:
            present = [depth_root / d for d in image_dirs if (depth_root / d).is_dir()]
            if present:
                if not (depth_root / mask_dir).is_dir():
                    raise DatasetFormatError(f"{layout}: the images are in {present[0]} but the lesion mask folder "
                                             f"{depth_root / mask_dir} is missing.")
                return layout, present, depth_root / mask_dir
    expected = "; ".join(f"{layout}: {' + '.join(dirs)} and {masks}" for layout, dirs, masks in ISIC_LAYOUTS)
    raise DatasetFormatError(f"No ISIC 2018 image folder in {raw_dir} or two levels below; expected {expected}.")


def _folders_below(raw_dir: Path, depth: int) -> list[Path]:
    """``raw_dir`` and its folders up to ``depth`` levels below, level by level (hidden and __MACOSX skipped)."""
    out, level = [], [raw_dir]
    for _ in range(depth + 1):
        out += level
        level = [child for folder in level for child in sorted(folder.iterdir())
                 if child.is_dir() and not child.name.startswith((".", "__MACOSX"))]
    return out


def _find_below(raw_dir: Path, name: str, what: str, depth: int = 2) -> Path:
    """The file ``name`` in ``raw_dir`` or up to ``depth`` folder levels below (the shallowest first)."""
    for folder in _folders_below(raw_dir, depth):
        if (folder / name).is_file():
            return folder / name
    raise DatasetFormatError(f"{raw_dir / name} not found (nor up to {depth} folder levels below): {what} is required.")


# ---------------------------------------------------------------------------- Kaggle bundle, layouts

LAYOUTS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "ham10000": ("HAM10000_metadata.csv", lambda d: any((d / n).is_file() for n in HAM_METADATA_FILES)),
    "montgomery": ("CXR_png/ and ManualMask/", lambda d: (d / "CXR_png").is_dir() and (d / "ManualMask").is_dir()),
    "shenzhen": ("CXR_png/ without ManualMask/",
                 lambda d: (d / "CXR_png").is_dir() and not (d / "ManualMask").is_dir()),
    "chestx-det10": ("train.json or test.json", lambda d: any((d / n).is_file() for n in CHESTX_DET10_JSON_FILES)),
    "isic2018-trap": (f"{ISIC_BIAS_CSV} (or artefacts-annotation/{ISIC_BIAS_CSV})",
                      lambda d: (d / ISIC_BIAS_CSV).is_file() or (d / "artefacts-annotation" / ISIC_BIAS_CSV).is_file()),
}
CONVERTERS: dict[str, Callable[..., Path]] = {
    "ham10000": convert_ham10000,
    "shenzhen": convert_shenzhen,
    "montgomery": convert_montgomery,
    "chestx-det10": convert_chestx_det10,
    "isic2018-trap": convert_isic2018_trap,
}
KAGGLE_BUNDLE = "mingchengzhu/segx-used-datasets"
KAGGLE_LAYOUTS = {"ham": ("ham10000",), "chestx": ("montgomery", "shenzhen", "chestx-det10")}


def convert_segx_kaggle(raw_dir: str | Path, out_dir: str | Path, which: str = "ham", seed: int = 0,
                        image_size: int | None = None, overwrite: bool = False) -> Path:
    """Convert the authors' Kaggle bundle (``mingchengzhu/segx-used-datasets``), once unzipped.

    Its exact layout is not documented, so this finds which known raw layout it holds (HAM10000
    for ``which="ham"``; Montgomery, Shenzhen or ChestX-Det10 for ``which="chestx"``) in
    ``raw_dir`` or up to two folder levels below, and runs that converter.
    """
    if which not in KAGGLE_LAYOUTS:
        raise ValueError(f"which must be one of {sorted(KAGGLE_LAYOUTS)}, got {which!r}")
    name, root = find_layout(raw_dir, KAGGLE_LAYOUTS[which])
    return CONVERTERS[name](root, out_dir, seed=seed, image_size=image_size, overwrite=overwrite)


def find_layout(raw_dir: str | Path, names: Sequence[str], depth: int = 2) -> tuple[str, Path]:
    """The first of the named raw layouts found in ``raw_dir`` or up to ``depth`` folder levels below.

    Returns ``(layout name, folder)``, searching level by level; raises :class:`DatasetFormatError`
    listing what was looked for when nothing matches.
    """
    raw_dir = _existing_dir(raw_dir)
    level = [raw_dir]
    for _ in range(depth + 1):
        for folder in level:
            for name in names:
                if LAYOUTS[name][1](folder):
                    return name, folder
        level = [child for folder in level for child in sorted(folder.iterdir())
                 if child.is_dir() and not child.name.startswith((".", "__MACOSX"))]
    looked_for = "; ".join(f"{LAYOUTS[name][0]} ({name})" for name in names)
    raise DatasetFormatError(
        f"No known raw dataset layout in {raw_dir} or up to {depth} folder levels below it; looked for: {looked_for}."
    )


# ------------------------------------------------------------------------------------ your own folder

@dataclass(frozen=True)
class LabelsCsv:
    """The labels of :func:`import_folder`: a CSV file (``path``) with ``image_id`` (each image's file name without
    its suffix) plus a ``label`` column of class names (``task="multiclass"``) or one 0/1 column per class
    (``task="multilabel"``). ``class_names`` fixes the class order (default: the sorted labels, or the CSV's
    columns)."""

    path: str | Path
    task: str
    class_names: Sequence[str] | None = None


@dataclass(frozen=True)
class MaskFolder:
    """The masks of :func:`import_folder`: ``folder/<image_id><suffix>.png`` (an image without a mask file is kept
    without one); ``description`` says what they outline (``mask_description`` in ``dataset.json``)."""

    folder: str | Path
    suffix: str = ""
    description: str = "clinical-interest region"


@dataclass(frozen=True)
class SplitChoice:
    """The split of :func:`import_folder`: ``own``, your split (a CSV file or a frame with ``image_id`` and
    ``split`` (train/val/test) columns; ``labels.csv`` itself when it has a ``split`` column), kept as it is; or,
    without it, a fresh 7:1:2 split stratified by label, drawn with ``seed``."""

    own: str | Path | pd.DataFrame | None = None
    seed: int = 0


@dataclass(frozen=True)
class FormatChoices:
    """How :func:`import_folder` writes the dataset: its ``name`` (default: the output folder's name), its
    ``modality`` (e.g. ``"chest X-ray"``, which chooses the training augmentation), ``channels`` (1 grayscale, 3
    RGB; None: 1 when every image is grayscale, else 3, printed) and ``image_size`` (a square of that many pixels;
    None: each image keeps its size)."""

    name: str | None = None
    modality: str = ""
    channels: int | None = None
    image_size: int | None = None


def import_folder(images_dir: str | Path, labels: LabelsCsv, out_dir: str | Path, masks: MaskFolder | None = None,
                  splits: SplitChoice = SplitChoice(), choices: FormatChoices = FormatChoices(),
                  overwrite: bool = False) -> Path:
    """Bring your own data: a folder of images (``images_dir/<image_id>.png|jpg``), a labels CSV
    (:class:`LabelsCsv`) and optionally a folder of masks (:class:`MaskFolder`), written to ``out_dir`` in the
    format, e.g. ``import_folder("raw/images", LabelsCsv("raw/labels.csv", "multiclass"), "data/mine",
    masks=MaskFolder("raw/masks", suffix="_mask"))``.

    ``splits`` (:class:`SplitChoice`): your own split, or a fresh stratified 7:1:2 one, with a warning when a
    ``splits.csv`` or a ``split`` column next to your data is thereby ignored. ``choices``
    (:class:`FormatChoices`): name, modality, channels, image size. A 16-bit series is scaled to 8 bits once for
    all its images (:func:`~segx_helpers.data.format.series_bit_depth`). Labels, ids, the mask folder and the
    splits are checked before any image is converted; each problem is a :class:`DatasetFormatError` naming the
    file or folder.
    """
    _check_groups(labels, masks, splits, choices)
    images_dir, labels_csv = _require_dir(Path(images_dir)), Path(labels.path)
    if not labels_csv.is_file():
        raise DatasetFormatError(f"Labels file {labels_csv} not found.")
    table = read_table_csv(labels_csv, required=["image_id"])
    user_splits = _user_splits(splits.own, table, labels_csv) if splits.own is not None else None
    if user_splits is None:
        _warn_ignored_splits(images_dir, labels_csv, table)
    table = table.drop(columns=["split"], errors="ignore")
    class_names, stratum = _classes_and_strata(table, labels, labels_csv)
    info = DatasetInfo(name=choices.name or Path(out_dir).name, modality=choices.modality, task=labels.task,
                       class_names=class_names,
                       mask_description=(masks or MaskFolder("")).description,
                       source=str(images_dir), licence="", channels=choices.channels or 3)
    parse_labels(table, info, labels_csv)  # NaN or unknown labels: refused before any image is converted
    ids = [_check_id(i, labels_csv) for i in table["image_id"]]
    images = _index_files([images_dir], IMAGE_SUFFIXES)
    _check_ids_name_files(ids, images, labels_csv, images_dir)
    found = _mask_files(masks, ids) if masks is not None else {}
    records = [_Record(i, images[i], _as_tuple(found.get(i))) for i in ids]
    chosen = user_splits if user_splits is not None else make_splits(ids, seed=splits.seed, stratify=stratum)
    empty = [split for split in SPLITS if not (chosen["split"] == split).any()]
    if empty:
        made = ("the splits you passed leave" if user_splits is not None else
                f"{len(ids)} images are too few for a 7:1:2 split stratified by label: it leaves")
        raise DatasetFormatError(f"{labels_csv}: {made} the {empty} split(s) empty (every split needs at least one "
                                 "image). Add images, or pass splits=SplitChoice(own=...) with your own train/val/test "
                                 "split.")
    if choices.channels is None:
        info = dataclasses.replace(info, channels=_detect_channels([images[i] for i in ids]))
    return _write(out_dir, info, records, table, chosen, choices.image_size, overwrite)


def _check_groups(labels, masks, splits, choices) -> None:
    """A ``TypeError`` saying how to pass each of :func:`import_folder`'s grouped arguments given as something else
    (e.g. a path for ``labels``)."""
    for value, kind, name in ((labels, LabelsCsv, "labels"), (masks, MaskFolder, "masks"), (splits, SplitChoice, "splits"),
                              (choices, FormatChoices, "choices")):
        if not isinstance(value, kind) and not (name == "masks" and value is None):
            raise TypeError(f"import_folder's {name} must be a {kind.__name__}(...), got {type(value).__name__} "
                            f"{value!r:.80}: e.g. labels=LabelsCsv('labels.csv', 'multiclass'), "
                            "masks=MaskFolder('masks', suffix='_mask'), splits=SplitChoice(own='splits.csv'), "
                            "choices=FormatChoices(channels=1)")


def _classes_and_strata(table: pd.DataFrame, labels: LabelsCsv, labels_csv: Path) -> tuple[list[str], pd.Series]:
    """The class names (in order) and one stratification key per row of the labels ``table``."""
    if labels.task == "multiclass":
        if "label" not in table.columns:
            raise DatasetFormatError(f"{labels_csv} needs a 'label' column for a multiclass task.")
        class_names = list(labels.class_names or sorted(table["label"].dropna().astype(str).unique()))
        return class_names, table["label"].astype(str)
    if labels.task == "multilabel":
        class_names = list(labels.class_names or [c for c in table.columns if c not in ("image_id", "split")])
        return class_names, table[class_names].astype(str).agg("".join, axis=1)
    raise ValueError(f"task must be 'multiclass' or 'multilabel', got {labels.task!r}")


def _check_ids_name_files(ids: Sequence[str], images: dict[str, Path], labels_csv: Path, images_dir: Path) -> None:
    """Every id of ``labels_csv`` has its image in ``images_dir``; ids written with their file suffix
    (``s00.png``) are refused saying that ids are file names without it."""
    missing = [i for i in ids if i not in images]
    suffixed = [i for i in missing if Path(i).suffix.lower() in IMAGE_SUFFIXES and Path(i).stem in images]
    if suffixed:
        raise DatasetFormatError(
            f"{labels_csv}: image ids are file names without their suffix, but {len(suffixed)} ids carry one (e.g. "
            f"{suffixed[:3]}): write {Path(suffixed[0]).stem!r} for {images_dir / suffixed[0]}.")
    _check_all_found(ids, images, images_dir.parent, [images_dir.name])


def _mask_files(masks: MaskFolder, ids: Sequence[str]) -> dict[str, Path]:
    """Image id -> its mask file in ``masks.folder``; a folder that does not exist, or whose ``.png`` files are the
    mask of no image (a wrong ``suffix``?), is a :class:`DatasetFormatError` naming it."""
    folder = Path(masks.folder)
    if not folder.is_dir():
        raise DatasetFormatError(f"Mask folder {folder} not found (is its name right?). Pass masks=None to import the "
                                 "images without masks.")
    found = _index_files([folder], (".png",), strip=masks.suffix)
    if found and not set(found) & set(ids):
        example = next(iter(found))
        raise DatasetFormatError(
            f"None of the {len(found)} .png files in {folder} is the mask of an image: masks are "
            f"<image_id>{masks.suffix}.png (suffix={masks.suffix!r}), e.g. {ids[0]}{masks.suffix}.png, but the folder "
            f"holds e.g. {example}{masks.suffix}.png. Set MaskFolder's suffix to the part after the image id.")
    return found


class IgnoredSplitsWarning(UserWarning):
    """``import_folder`` made a fresh split although a split of the user's own was found next to the data."""


def _user_splits(splits: str | Path | pd.DataFrame, labels: pd.DataFrame, labels_csv: Path) -> pd.DataFrame:
    """The user's split as an ``image_id, split`` frame covering exactly the ids of ``labels``."""
    source = "the splits frame"
    if not isinstance(splits, pd.DataFrame):
        source = str(splits)
        if not Path(splits).is_file():
            raise DatasetFormatError(f"Splits file {splits} not found.")
        splits = labels if Path(splits).resolve() == labels_csv.resolve() else pd.read_csv(splits, dtype={"image_id": str})
    if not {"image_id", "split"} <= set(splits.columns):
        raise DatasetFormatError(f"{source} needs image_id and split columns (has {list(splits.columns)}).")
    frame = splits[["image_id", "split"]].astype(str)
    bad = sorted(set(frame["split"]) - {"train", "val", "test"})
    if bad:
        raise DatasetFormatError(f"{source}: unknown split names {bad}; use train, val and test.")
    if frame["image_id"].duplicated().any():
        raise DatasetFormatError(f"{source}: duplicate image ids {frame['image_id'][frame['image_id'].duplicated()].tolist()[:5]}.")
    ids = labels["image_id"].astype(str)
    missing = sorted(set(ids) - set(frame["image_id"]))
    if missing:
        raise DatasetFormatError(f"{source}: {len(missing)} ids of {labels_csv} have no split (e.g. {missing[:5]}).")
    extra = sorted(set(frame["image_id"]) - set(ids))
    if extra:
        warnings.warn(f"{source}: {len(extra)} ids are not in {labels_csv} and are left out (e.g. {extra[:5]}).",
                      UserWarning, stacklevel=3)
    return frame.set_index("image_id").loc[ids].reset_index()


def _warn_ignored_splits(images_dir: Path, labels_csv: Path, labels: pd.DataFrame) -> None:
    found = [str(p) for p in dict.fromkeys(d / "splits.csv" for d in (images_dir, images_dir.parent, labels_csv.parent))
             if p.is_file()]
    if "split" in labels.columns:
        found.append(f"the split column of {labels_csv}")
    if found:
        warnings.warn(f"import_folder ignores your split ({', '.join(found)}) and makes a fresh stratified 7:1:2 split; "
                      "pass splits=SplitChoice(own=<that file>) to keep yours.", IgnoredSplitsWarning,
                      stacklevel=3)


def _detect_channels(paths: Sequence[Path], max_checked: int = 64) -> int:
    """1 when the images are grayscale (single-channel files, or RGB ones with equal channels), else 3;
    prints which. Files are opened for their mode; at most ``max_checked`` RGB files are read in full."""
    colour = []
    rgb_paths = [path for path in paths if image_mode(path) in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "PA")]
    step = max(1, -(-len(rgb_paths) // max_checked))
    for path in rgb_paths[::step]:
        pixels = read_image(path, channels=3).astype(np.int16)
        if np.abs(pixels - pixels[:, :, :1]).max() > 2:  # JPEG leaves small differences in gray images
            colour.append(path)
            break
    if colour:
        print(f"import_folder: channels=3 (RGB): {colour[0].name} is a colour image; pass "
              "choices=FormatChoices(channels=1) for grayscale")
        return 3
    checked = len(paths) - len(rgb_paths) + len(rgb_paths[::step])
    print(f"import_folder: channels=1 (grayscale): the {checked} of {len(paths)} images checked are all grayscale; "
          "pass choices=FormatChoices(channels=3) to keep RGB")
    return 1


# ------------------------------------------------------------------------------------ shared steps

def _write(out_dir, info: DatasetInfo, records: list[_Record], labels: pd.DataFrame, splits: pd.DataFrame,
           image_size: int | None, overwrite: bool, extras: DatasetExtras = NO_EXTRAS) -> Path:
    """Read, optionally resize and write every record; warn once about the images without a mask. The 16-bit
    images of the series are scaled with one bit depth for all (:func:`~segx_helpers.data.format.series_bit_depth`)."""
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    unmasked = [r.image_id for r in records if not r.masks]
    if unmasked:
        warnings.warn(
            f"{info.name}: {len(unmasked)} of {len(records)} images have no mask (e.g. {unmasked[:3]}); they are "
            "kept without one.",
            MissingMaskWarning,
            stacklevel=3,
        )

    bit_depth = series_bit_depth([r.image for r in records])
    if bit_depth is not None:
        print(f"{info.name}: 16-bit images, scaled to 8 bits as {bit_depth}-bit for the whole series"
              + (" (every image's maximum is below 4096)" if bit_depth == 12 else ""))

    def samples():
        for record in tqdm(records, desc=info.name, unit="image"):
            image, mask = _load(record, info.channels, image_size, bit_depth)
            yield record.image_id, image, mask

    return write_dataset(out_dir, info, samples(), labels, splits, overwrite=overwrite, extras=extras)


def _load(record: _Record, channels: int, image_size: int | None,
          bit_depth: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    image = read_image(record.image, channels=channels, bit_depth=bit_depth)
    mask = None
    if record.masks:
        mask = np.logical_or.reduce([read_mask(p, expected_size=image.shape[:2]) for p in record.masks])
    if image_size is not None:
        image = _resize(image, image_size, Image.Resampling.BILINEAR)
        if mask is not None:
            mask = _resize(np.where(mask, 255, 0).astype(np.uint8), image_size, Image.Resampling.NEAREST) > 0
    return image, mask


def _resize(array: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    plane = array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array
    return np.asarray(Image.fromarray(plane).resize((size, size), resample))


def _index_files(folders: Sequence[Path], suffixes: Sequence[str], strip: str = "") -> dict[str, Path]:
    """Map file stem (less ``strip`` at its end) -> file, over those of ``folders`` that exist.

    The first folder listed wins when a stem occurs in two folders; two files of one stem in the same
    folder (``x.png`` and ``x.jpg``) are a :class:`DatasetFormatError` naming both.
    """
    index: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            here: dict[str, Path] = {}
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in suffixes:
                    stem = path.stem.removesuffix(strip)
                    if stem in here:
                        raise DatasetFormatError(f"{here[stem]} and {path} share the id {stem!r}: keep one of them "
                                                 "(ids are file names without their suffix).")
                    here[stem] = path
            for stem, path in here.items():
                index.setdefault(stem, path)
    return index


def _check_all_found(ids: Sequence[str], files: dict[str, Path], raw_dir: Path, folders: Sequence[str]) -> None:
    missing = [i for i in ids if i not in files]
    if missing:
        raise DatasetFormatError(
            f"{len(missing)} of {len(ids)} images listed in the annotations are missing from "
            f"{[str(raw_dir / f) for f in folders]} (e.g. {missing[:5]}); is part of the download missing?"
        )


def _existing_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DatasetFormatError(f"Raw data folder {path} does not exist.")
    return path


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DatasetFormatError(f"Folder {path} not found.")
    return path


def _require_any_dir(root: Path, folders: Sequence[str], what: str) -> list[Path]:
    present = [root / f for f in folders if (root / f).is_dir()]
    if not present:
        raise DatasetFormatError(f"No {what} folder in {root}: expected at least one of {list(folders)}.")
    return present


def _check_id(image_id: str, source: Path) -> str:
    try:
        return check_safe_id(image_id)
    except ValueError as err:
        raise DatasetFormatError(f"{source}: {err}") from None


def _as_tuple(path: Path | None) -> tuple[Path, ...]:
    return () if path is None else (path,)


# --------------------------------------------------------------------------------------------- CLI
