"""Image data sets of the paper (MNIST, Fashion-MNIST, CIFAR-10), loaded into memory from local files.

Works offline from local copies (IDX files, CIFAR pickles, image folders or archives) and downloads with
torchvision when online. torchvision, Pillow and numpy are imported lazily, only by the layouts that need
them.
See :mod:`supermask_fx.data.vision` for where files are searched.

Note: CIFAR-10 read from the JPEG image-folder copy is not bit-exact; report figures from it as
"CIFAR-10 (JPEG copy)" (``dataset.display_name``).
"""

from __future__ import annotations

from .errors import DatasetFormatError, DatasetNotFoundError
from .idx import read_idx
from .imagefolder import ImageFolderSplit, extract_archive, load_image_folder
from .info import DATASET_NAMES, DatasetInfo, canonical_name, dataset_info
from .paths import default_cache_dir
from .subset import random_subset, subset_indices
from .vision import (
    ENV_VAR,
    ImageTensorDataset,
    download_possible,
    is_available_offline,
    load_dataset,
    local_copy_is_exact,
    search_locations,
)

__all__ = [
    "DATASET_NAMES",
    "ENV_VAR",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageFolderSplit",
    "ImageTensorDataset",
    "canonical_name",
    "dataset_info",
    "default_cache_dir",
    "download_possible",
    "extract_archive",
    "is_available_offline",
    "load_dataset",
    "load_image_folder",
    "local_copy_is_exact",
    "random_subset",
    "read_idx",
    "search_locations",
    "subset_indices",
]
