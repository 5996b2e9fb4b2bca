"""The one dataset format every notebook reads, and its validator.

A dataset is a folder::

    images/<id>.png|jpg   the images (RGB, grayscale or 16-bit grayscale)
    masks/<id>.png        clinical-interest region, binary, same size as the image (optional per image)
    labels.csv            image_id + one ``label`` column of class names (multiclass)
                          or one 0/1 column per class (multilabel)
    splits.csv            image_id,split with split in {train, val, test}
    dataset.json          name, modality, task, class_names, mask_description, source, licence, ...

Optional, written by the synthetic generators (and ignored by everything that does not ask for them):

    artefacts.csv                 image_id + one 0/1 column per artefact kind the image carries
    artefacts/<id>.png            where the artefacts are: uint8 bit flags, bit k set where artefact kind k
                                  (the k-th artefact column of artefacts.csv) covers the pixel; non-zero =
                                  the union of every spurious artefact, always outside the clinical region
    twins/<id>__<artefact>.png    the image's counterfactual twin: rendered again from the same random
                                  state with that shortcut artefact removed (or added where it was absent)

Real datasets may carry an ``artefacts.csv`` of annotated artefact flags (e.g. the ISIC trap sets).

``load_dataset`` validates all of it and raises :class:`DatasetFormatError` naming the offending file.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from segx_helpers.data.io import atomic_path, check_only_listed_files, check_safe_id, files_below, write_json
from segx_helpers.data.augmentation import Augmentation

TASKS = ("multiclass", "multilabel")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetFormatError(ValueError):
    """A dataset folder does not follow the format; the message names the file and the fix."""


class NonBinaryMaskWarning(UserWarning):
    """A mask had values other than {0, 1}, {0, 255} or {0, 65535} and was thresholded at half its maximum."""


class LabelMapMaskWarning(NonBinaryMaskWarning):
    """A mask was an integer label map (e.g. {0, 1, 2}); every non-zero label was read as foreground."""


LABEL_MAP_MAX = 31
"""A mask whose values are all integers up to this (or a palette image) is a label map, not a grey mask."""

_label_map_folders: set[str] = set()


@dataclass
class DatasetInfo:
    """Contents of ``dataset.json``: what the dataset is and how to read its labels and masks."""

    name: str
    modality: str
    task: str
    class_names: list[str]
    mask_description: str
    source: str = ""
    licence: str = ""
    channels: int = 3
    generator: dict = field(default_factory=dict)
    augmentation: dict | None = None
    """Training augmentation, e.g. ``{"hflip": false, "vflip": false, "rotation": 5.0}``; ``None`` (or absent):
    the modality's default, see :func:`segx_helpers.data.augmentation.augmentation_for`."""

    def __post_init__(self) -> None:
        for name in ("name", "modality", "task", "mask_description", "source", "licence"):
            if not isinstance(getattr(self, name), str):
                raise DatasetFormatError(f"dataset.json: {name} must be a string, got {getattr(self, name)!r}.")
        if self.task not in TASKS:
            raise DatasetFormatError(f"dataset.json: task must be one of {TASKS}, got {self.task!r}.")
        if (not isinstance(self.class_names, list) or not self.class_names
                or not all(isinstance(c, str) and c for c in self.class_names)
                or len(set(self.class_names)) != len(self.class_names)):
            raise DatasetFormatError("dataset.json: class_names must be a non-empty list of distinct names (strings), "
                                     f"got {self.class_names!r}.")
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise DatasetFormatError(f"dataset.json: channels must be 1 or 3, got {self.channels!r}.")
        if not isinstance(self.generator, dict):
            raise DatasetFormatError(f"dataset.json: generator must be an object (a dict), got {self.generator!r}.")
        if self.augmentation is not None:
            try:
                Augmentation.from_dict(self.augmentation)
            except ValueError as err:
                raise DatasetFormatError(f"dataset.json: {err}.") from err

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class LoadedDataset:
    """A validated dataset: its description and one row per image.

    ``table`` columns: image_id, split, image_path, mask_path (None when absent) and, for a
    multiclass task, ``label`` (class name) and ``target`` (class index); for a multilabel task one
    0/1 column per class. ``targets`` gives the targets as an array: ``(N,)`` int class indices
    (multiclass) or ``(N, C)`` float 0/1 (multilabel), in table order.
    """

    root: Path
    info: DatasetInfo
    table: pd.DataFrame

    @property
    def targets(self) -> np.ndarray:
        if self.info.task == "multiclass":
            return self.table["target"].to_numpy(dtype=np.int64)
        return self.table[self.info.class_names].to_numpy(dtype=np.float32)

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split, in a stable order."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.table[self.table["split"] == name].reset_index(drop=True)


# ----------------------------------------------------------------------------------------- reading

def read_image(path: str | Path, channels: int = 3, bit_depth: int | None = None) -> np.ndarray:
    """Read an image as uint8 ``(H, W, channels)``.

    RGBA loses its alpha channel, grayscale is replicated to RGB when ``channels == 3``, and 16-bit
    radiographs are scaled to 8 bits by their bit depth: ``bit_depth`` (e.g. 12: the value 4095 becomes 255)
    when given, as for a whole series (:func:`series_bit_depth`), else guessed for this image alone (12-bit
    when its maximum is below 4096). Missing, unreadable, zero-byte and truncated files raise
    :class:`DatasetFormatError` naming the file.
    """
    path = Path(path)
    with _open_checked(path, "image") as img:
        array = _to_uint8(img, bit_depth)
    if array.ndim == 2:
        array = array[:, :, None]
    if channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 1 and array.shape[2] == 3:
        array = np.asarray(Image.fromarray(array).convert("L"))[:, :, None]
    return np.array(array, copy=True)


def _too_many_pixels(path: Path, what: str, err: Exception) -> DatasetFormatError:
    return DatasetFormatError(
        f"{what} file {path} has too many pixels to decode safely ({err}). PIL refuses it as a possible decompression "
        "bomb; if the file is genuine, raise PIL.Image.MAX_IMAGE_PIXELS before loading (or downscale it)."
    )


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def _open_checked(path: str | Path, what: str = "image", decode: bool = True) -> Image.Image:
    """``path`` opened with PIL (its pixels decoded unless ``decode`` is False), to use in a ``with`` block. A
    missing, zero-byte, unreadable or truncated file, or one with too many pixels to decode safely, is a
    :class:`DatasetFormatError` naming it as an ``what`` file (``"image"`` or ``"mask"``): the one place
    :func:`read_image`, :func:`read_mask` and :func:`image_size` check their files."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"Missing {what} file: {path}")
    if path.stat().st_size == 0:
        raise DatasetFormatError(f"Empty (zero-byte) {what} file: {path}")
    img = None
    try:
        img = Image.open(path)
        if decode:
            img.load()
        return img
    except Image.DecompressionBombError as err:
        _close(img)
        raise _too_many_pixels(path, what.capitalize(), err) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        _close(img)
        state = "Unreadable or truncated" if decode else "Unreadable"
        raise DatasetFormatError(f"{state} {what} file: {path} ({err})") from err


def _close(img: Image.Image | None) -> None:
    if img is not None:
        img.close()


def series_bit_depth(paths: Sequence[str | Path]) -> int | None:
    """The bit depth of the 16-bit images among ``paths``, for one scaling of the whole series: 12 when every
    one's maximum is below 4096, else 16; None when none is 16-bit. Reads the pixels of the 16-bit files only
    (one at a time); the others' headers."""
    sixteen = [path for path in paths if image_mode(path) in SIXTEEN_BIT_MODES]
    if not sixteen:
        return None
    top = 0.0
    for path in sixteen:
        with _open_checked(path, "image") as img:
            top = max(top, float(np.asarray(img).max()))
    return 12 if top < 4096 else 16


def _to_uint8(img: Image.Image, bit_depth: int | None = None) -> np.ndarray:
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)
        depth = float(2 ** bit_depth - 1) if bit_depth is not None else 4095.0 if values.max() < 4096 else 65535.0
        return np.clip(np.round(values / depth * 255.0), 0, 255).astype(np.uint8)
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        span = max(values.max() - values.min(), 1e-12)
        return np.round((values - values.min()) / span * 255.0).astype(np.uint8)
    if img.mode in ("L", "RGB"):
        return np.asarray(img)
    if img.mode in ("1", "P", "LA"):
        return np.asarray(img.convert("L" if img.mode != "P" else "RGB"))
    return np.asarray(img.convert("RGB"))


def read_mask(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask as bool ``(H, W)``.

    * {0, 1}, {0, 255} and (16-bit) {0, 65535} masks are read exactly, silently.
    * Integer label maps, i.e. palette images or masks whose values are all at most
      :data:`LABEL_MAP_MAX` (e.g. {0, 1, 2}: left and right lung labelled separately): every non-zero
      label is foreground, with one :class:`LabelMapMaskWarning` per folder.
    * Other grey masks (8- or 16-bit) are thresholded at half their maximum value with a
      :class:`NonBinaryMaskWarning` naming the file.

    ``expected_size`` is the image's ``(H, W)``; a mask of another size is an error.
    """
    path = Path(path)
    with _open_checked(path, "mask") as img:
        palette = img.mode == "P"
        values = np.asarray(img if img.mode in ("L", "1", "P") + SIXTEEN_BIT_MODES else img.convert("L"))
    if values.ndim != 2:
        raise DatasetFormatError(f"Mask {path} must be single-channel, got shape {values.shape}.")
    if expected_size is not None and values.shape != tuple(expected_size):
        raise DatasetFormatError(
            f"Mask {path} has size {values.shape[1]}x{values.shape[0]} (WxH) but its image is "
            f"{expected_size[1]}x{expected_size[0]}; masks must have the same size as their image."
        )
    if values.dtype == bool:
        return values
    unique = np.unique(values)
    if any(np.isin(unique, (0, on)).all() for on in (1, 255, 65535)):
        return values > 0
    if palette or (np.issubdtype(values.dtype, np.integer) and unique.min() >= 0 and unique.max() <= LABEL_MAP_MAX):
        folder = str(path.parent.resolve())
        if folder not in _label_map_folders:
            _label_map_folders.add(folder)
            warnings.warn(
                f"Mask {path} is an integer label map (values {unique[:8].tolist()}): every non-zero label is read as "
                f"foreground (the union of the labelled structures). Other label-map masks in {path.parent} are read "
                "the same way without another warning.",
                LabelMapMaskWarning,
                stacklevel=2,
            )
        return values != 0
    top = float(values.max()) if values.max() > 1 else 1.0
    warnings.warn(
        f"Mask {path} is not binary (values {unique[:6].tolist()}...); thresholded at {top / 2:g}.",
        NonBinaryMaskWarning,
        stacklevel=2,
    )
    return values > top / 2


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file without decoding the pixels."""
    return _header(path)[1]


def image_mode(path: str | Path) -> str:
    """PIL's mode of an image file (``"RGB"``, ``"L"``, ``"I;16"``, ...) without decoding the pixels."""
    return _header(path)[0]


def _header(path: str | Path) -> tuple[str, tuple[int, int]]:
    """Mode and ``(H, W)`` from an image file's header; problems are a :class:`DatasetFormatError` naming it."""
    with _open_checked(path, "image", decode=False) as img:
        width, height = img.size
        return img.mode, (height, width)


# ----------------------------------------------------------------------------------------- loading

def load_info(root: str | Path) -> DatasetInfo:
    """Read and check ``dataset.json``."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DatasetFormatError(
            f"{path} not found: a dataset folder needs dataset.json (run notebook 01 or "
            "segx_helpers.data.write_dataset to create one)."
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"{path} must hold a JSON object ({{\"name\": ..., \"class_names\": [...], ...}}), "
                                 f"got a {type(raw).__name__}.")
    known = {f for f in DatasetInfo.__dataclass_fields__}
    missing = {"name", "modality", "task", "class_names", "mask_description"} - raw.keys()
    unknown = sorted(raw.keys() - known)
    ignored = f"; its unknown fields {unknown} are ignored" if unknown else ""
    if missing:
        raise DatasetFormatError(
            f"{path} lacks the fields {sorted(missing)}{ignored}. The format's fields are {sorted(known)}; to bring a "
            "folder of images, masks and a labels CSV into the format, use segx_helpers.data.converters.import_folder.")
    if unknown:
        warnings.warn(f"{path}: unknown fields {unknown} are ignored (the format's fields are {sorted(known)}).",
                      UserWarning, stacklevel=3)
    return DatasetInfo(**{k: v for k, v in raw.items() if k in known})


def load_dataset(root: str | Path, check_files: bool = True) -> LoadedDataset:
    """Load and validate a dataset folder.

    Checks labels.csv and splits.csv against each other and against dataset.json, and (when
    ``check_files``) that every image is readable and every mask exists where expected, has the
    image's size and is binary. Every problem raises :class:`DatasetFormatError` naming the file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"Dataset folder {root} does not exist.")
    info = load_info(root)
    labels = read_table_csv(root / "labels.csv", required=["image_id"])
    splits = read_table_csv(root / "splits.csv", required=["image_id", "split"])
    for frame, name in ((labels, "labels.csv"), (splits, "splits.csv")):
        frame["image_id"] = frame["image_id"].astype(str)
        dupes = frame["image_id"][frame["image_id"].duplicated()].unique()
        if len(dupes):
            raise DatasetFormatError(f"{root / name}: duplicate image ids {list(dupes[:5])}.")
        for image_id in frame["image_id"]:
            try:
                check_safe_id(image_id)
            except ValueError as err:
                raise DatasetFormatError(f"{root / name}: {err}") from None
    table = parse_labels(labels, info, root / "labels.csv")
    bad_split = sorted(set(splits["split"]) - set(SPLITS))
    if bad_split:
        raise DatasetFormatError(f"{root / 'splits.csv'}: unknown split names {bad_split}; use {SPLITS}.")
    unknown = sorted(set(table["image_id"]) - set(splits["image_id"]))
    if unknown:
        raise DatasetFormatError(f"{root / 'labels.csv'}: ids not in splits.csv: {unknown[:5]}.")
    extra = sorted(set(splits["image_id"]) - set(table["image_id"]))
    if extra:
        raise DatasetFormatError(f"{root / 'splits.csv'}: ids without a row in labels.csv: {extra[:5]}.")
    table = table.merge(splits[["image_id", "split"]], on="image_id", how="left")
    for split in SPLITS:
        if not (table["split"] == split).any():
            raise DatasetFormatError(f"{root / 'splits.csv'}: the {split!r} split is empty.")
    table["image_path"] = [_find_image(root, i) for i in table["image_id"]]
    table["mask_path"] = pd.Series([_mask_or_none(root, i) for i in table["image_id"]], index=table.index, dtype=object)
    if check_files:
        for row in table.itertuples():
            size = image_size(row.image_path)
            read_image(row.image_path, channels=info.channels)
            if row.mask_path is not None:
                read_mask(row.mask_path, expected_size=size)
    _warn_missing_classes(table, info)
    order = ["image_id", "split", "image_path", "mask_path"]
    table = table[order + [c for c in table.columns if c not in order]]
    return LoadedDataset(root=root, info=info, table=table.reset_index(drop=True))


def read_table_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """A CSV file with an ``image_id`` column (read as text) and the ``required`` columns; an empty,
    unparsable or incomplete file is a :class:`DatasetFormatError` naming it."""
    if not path.is_file():
        raise DatasetFormatError(f"{path} not found.")
    try:
        frame = pd.read_csv(path, dtype={"image_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path} cannot be parsed as CSV: {err}") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetFormatError(f"{path} lacks the columns {missing} (has {list(frame.columns)}).")
    if frame["image_id"].isna().any():
        raise DatasetFormatError(f"{path}: empty image_id in rows {frame.index[frame['image_id'].isna()].tolist()[:5]}.")
    return frame


def parse_labels(labels: pd.DataFrame, info: DatasetInfo, path: Path) -> pd.DataFrame:
    """The labels of ``info``'s task checked against its class names: ``image_id, label, target``
    (multiclass) or ``image_id`` + one int column per class (multilabel). NaN labels, unknown classes
    and non-0/1 multilabel values are a :class:`DatasetFormatError` naming ``path``."""
    table = labels.copy()
    if info.task == "multiclass":
        if "label" not in table.columns:
            raise DatasetFormatError(f"{path}: a multiclass dataset needs a 'label' column of class names.")
        if table["label"].isna().any():
            rows = table.loc[table["label"].isna(), "image_id"].tolist()[:5]
            raise DatasetFormatError(f"{path}: missing (NaN) labels for ids {rows}.")
        table["label"] = table["label"].astype(str)
        unknown = sorted(set(table["label"]) - set(info.class_names))
        if unknown:
            raise DatasetFormatError(f"{path}: unknown class names {unknown}; dataset.json lists {info.class_names}.")
        lookup = {name: i for i, name in enumerate(info.class_names)}
        table["target"] = table["label"].map(lookup).astype(np.int64)
        return table[["image_id", "label", "target"]]
    missing = [c for c in info.class_names if c not in table.columns]
    if missing:
        raise DatasetFormatError(f"{path}: a multilabel dataset needs one 0/1 column per class; missing {missing}.")
    extra = [c for c in table.columns if c not in info.class_names and c != "image_id"]
    if extra:
        raise DatasetFormatError(f"{path}: unknown class columns {extra}; dataset.json lists {info.class_names}.")
    values = table[info.class_names]
    if values.isna().any().any():
        rows = table.loc[values.isna().any(axis=1), "image_id"].tolist()[:5]
        raise DatasetFormatError(f"{path}: missing (NaN) labels for ids {rows}.")
    if not values.isin([0, 1]).all().all():
        raise DatasetFormatError(f"{path}: multilabel columns must hold only 0 or 1.")
    table[info.class_names] = values.astype(np.int64)
    return table[["image_id"] + info.class_names]


def _find_image(root: Path, image_id: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        candidate = root / "images" / f"{image_id}{suffix}"
        if candidate.is_file():
            return str(candidate)
    raise DatasetFormatError(f"Missing image for id {image_id!r}: expected {root / 'images' / image_id}.png or .jpg")


def _mask_or_none(root: Path, image_id: str) -> str | None:
    candidate = root / "masks" / f"{image_id}.png"
    return str(candidate) if candidate.is_file() else None


def _warn_missing_classes(table: pd.DataFrame, info: DatasetInfo) -> None:
    for split in SPLITS:
        part = table[table["split"] == split]
        if info.task == "multiclass":
            counts = part["target"].value_counts()
            absent = [n for i, n in enumerate(info.class_names) if counts.get(i, 0) == 0]
        else:
            absent = [n for n in info.class_names if part[n].sum() == 0]
        if absent:
            warnings.warn(
                f"The {split!r} split has no images of class(es) {absent}: per-class metrics for them are undefined there.",
                UserWarning,
                stacklevel=3,
            )


# ----------------------------------------------------------------------------------------- writing

def make_splits(
    image_ids: Sequence[str],
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    stratify: Sequence | None = None,
) -> pd.DataFrame:
    """Assign train/val/test deterministically given ``seed`` (7:1:2 like the reference code).

    With ``stratify`` (one class key per id) each class is split in the same proportions.
    """
    if not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    ids = np.asarray([str(i) for i in image_ids])
    keys = np.zeros(len(ids), dtype=int) if stratify is None else pd.factorize(pd.Series(list(stratify)).astype(str))[0]
    rng = np.random.default_rng(seed)
    split = np.empty(len(ids), dtype=object)
    for key in np.unique(keys):
        members = rng.permutation(np.flatnonzero(keys == key))
        n_train = int(round(fractions[0] * len(members)))
        n_val = int(round(fractions[1] * len(members)))
        split[members[:n_train]] = "train"
        split[members[n_train:n_train + n_val]] = "val"
        split[members[n_train + n_val:]] = "test"
    return pd.DataFrame({"image_id": ids, "split": split})


@dataclass(frozen=True)
class DatasetExtras:
    """What :func:`write_dataset` writes besides the images, masks, labels and splits, once ``samples`` is
    consumed (so that what the samples produced can go in): ``tables()`` returns more CSV files (name ->
    frame), e.g. the synthetic ``artefacts.csv``; ``files(folder)`` writes more files into the (temporary)
    dataset folder, e.g. the synthetic artefact maps and twins."""

    tables: Callable[[], dict[str, pd.DataFrame]] | None = None
    files: Callable[[Path], None] | None = None


NO_EXTRAS = DatasetExtras()


def write_dataset(
    root: str | Path,
    info: DatasetInfo,
    samples: Iterable[tuple[str, np.ndarray, np.ndarray | None]],
    labels: pd.DataFrame,
    splits: pd.DataFrame,
    overwrite: bool = False,
    image_format: str = "png",
    extras: DatasetExtras = NO_EXTRAS,
) -> Path:
    """Write a dataset folder atomically from ``(image_id, image (H, W[, C]) uint8, mask (H, W) bool | None)``.

    Everything is written to a temporary sibling folder that is renamed onto ``root`` only when
    complete. An existing ``root`` is replaced only with ``overwrite=True`` *and* only if it was
    written by this package (its dataset.json carries a ``generator`` entry) and holds no file the
    writer did not put there (the writer lists its files in ``.segx_files.json``; a folder written
    before that list existed is checked by its ``generator`` entry only): user data is never replaced.
    ``extras``: more tables and files (:class:`DatasetExtras`). An image of height or width 1 is stored as it is
    (only a channel axis of 1 is dropped).
    """
    root = Path(root)
    if root.exists():
        _check_owned(root)  # before atomic_path's refusal, which would suggest overwrite=True for user data
    with atomic_path(root, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        seen: set[str] = set()
        for image_id, image, mask in samples:
            check_safe_id(image_id)
            if image_id in seen:
                raise DatasetFormatError(f"Duplicate image id {image_id!r} while writing {root}.")
            seen.add(image_id)
            image_file(image).save(tmp / "images" / f"{image_id}.{image_format}")
            if mask is not None:
                if mask.shape != image.shape[:2]:
                    raise DatasetFormatError(f"Mask for {image_id!r} has shape {mask.shape}, image {image.shape[:2]}.")
                Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp / "masks" / f"{image_id}.png")
        for name, frame in (extras.tables() if extras.tables else {}).items():
            frame.to_csv(tmp / name, index=False)
        if extras.files is not None:
            extras.files(tmp)
        labels.to_csv(tmp / "labels.csv", index=False)
        splits.to_csv(tmp / "splits.csv", index=False)
        write_json(tmp / "dataset.json", asdict(info))
        load_dataset(tmp, check_files=False)
        write_json(tmp / WRITTEN_FILES, {"written_by": "segx_helpers.data.format.write_dataset",
                                         "files": sorted(files_below(tmp, WRITTEN_FILES))})
    return root


WRITTEN_FILES = ".segx_files.json"


def image_file(image: np.ndarray) -> Image.Image:
    """A uint8 image ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` as a PIL image of that height and width (a
    channel axis of 1 is dropped, never a height or width of 1)."""
    array = np.asarray(image, dtype=np.uint8)
    return Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)


def _check_owned(root: Path) -> None:
    try:
        info = load_info(root)
    except DatasetFormatError:
        info = None
    if info is None or not info.generator:
        raise FileExistsError(
            f"{root} already exists and was not written by segx_helpers as a generated dataset (no 'generator' entry in its "
            "dataset.json: converted, imported and your own data are never replaced, with or without overwrite=True); "
            "refusing to replace it. Choose another folder, or remove it yourself to write it again."
        )
    if (root / WRITTEN_FILES).is_file():
        check_only_listed_files(root, WRITTEN_FILES, "refusing to replace it, to keep them. Move them out of the "
                                "folder, or choose another folder")
