"""Datasets: the folder format, synthetic generators, real-data converters and the torch Dataset."""
from segx_helpers.data.format import (DatasetFormatError, DatasetInfo, LabelMapMaskWarning, LoadedDataset, NonBinaryMaskWarning,
                     load_dataset, make_splits, read_image, read_mask, write_dataset)
from segx_helpers.data.synthetic import SyntheticConfig, ensure_synthetic, generate_synthetic_cxr, generate_synthetic_derm, load_artefacts

__all__ = [
    "DatasetFormatError", "DatasetInfo", "LabelMapMaskWarning", "LoadedDataset", "NonBinaryMaskWarning", "load_dataset",
    "make_splits", "read_image", "read_mask", "write_dataset", "SyntheticConfig", "ensure_synthetic", "generate_synthetic_cxr",
    "generate_synthetic_derm", "load_artefacts",
]
