"""Loading MNIST, Fashion-MNIST and CIFAR-10 into memory from local files, or downloading them.

Every split is held as one ``uint8`` tensor ``(N, C, H, W)`` plus ``int64`` targets; items are normalised
``float32`` images. Where the files are looked for, in order:

1. ``root`` (the argument), if given: the files directly in it, or in one of the sub-folders below.
2. ``$SUPERMASK_FX_DATA`` (one or more folders separated by ``os.pathsep``): the sub-folders below.
3. Standard places: ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``), then the
   sub-folders below in ``/usr/share/datasets``, in ``~/.cache/supermask_fx/data`` (where downloads go) and in
   the project's ``../shared/data`` folder (next to a source checkout).

Sub-folders per data set:

* ``mnist``: ``mnist/``, ``MNIST/raw/`` (torchvision's layout) with ``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz`` (the same names
  without ``.gz`` also work).
* ``fashion_mnist``: ``fashion-mnist/``, ``fashion_mnist/``, ``FashionMNIST/raw/`` with the same file names.
* ``cifar10``: ``cifar-10-batches-py/`` (torchvision's pickles ``data_batch_1..5``, ``test_batch``;
  bit-exact), or an image folder ``cifar10-jpeg/``, ``cifar10/``, ``cifar-10/`` with ``train/<class>/*.jpg``
  and ``test/<class>/*.jpg``, or an archive ``cifar*.tar.gz`` of either layout in the searched folder or those
  sub-folders. The image-folder copy in ``shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz`` was JPEG-encoded, so
  it is **not bit-exact**: figures obtained from it must be labelled "CIFAR-10 (JPEG copy)"
  (``dataset.display_name`` says so).

Nothing is written into or beside the folders searched: an archive is extracted once, and the decoded tensors
of an image folder are cached, in the library's cache folder (``$SUPERMASK_FX_CACHE``, else
``$XDG_CACHE_HOME/supermask_fx``, else ``~/.cache/supermask_fx``: ``extracted/`` and ``imagefolder/``; see
:func:`~supermask_fx.data.imagefolder.extract_archive`), and the first load says where on stderr.

If nothing is found and ``download=True``, ``torchvision.datasets.{MNIST, FashionMNIST, CIFAR10}`` downloads
the data into ``root`` (or the first ``$SUPERMASK_FX_DATA`` folder, or ``~/.cache/supermask_fx/data``).
torchvision is imported only then.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import Dataset

from .errors import DatasetFormatError, DatasetNotFoundError
from .idx import read_idx
from .imagefolder import _LOSSY_EXTENSIONS, IMAGE_EXTENSIONS, extract_archive, find_split_root, load_image_folder
from .info import DatasetInfo, canonical_name, dataset_info
from .paths import default_cache_dir

__all__ = [
    "ENV_VAR",
    "ImageTensorDataset",
    "download_possible",
    "is_available_offline",
    "load_dataset",
    "local_copy_is_exact",
    "search_locations",
]

#: Environment variable naming extra data folders (``os.pathsep``-separated).
ENV_VAR = "SUPERMASK_FX_DATA"
SPLITS = ("train", "test")

_SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
    "cifar10": ("cifar-10-batches-py", "cifar10-jpeg", "cifar10", "cifar-10"),
}
_SYSTEM_DIRS = {"fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),)}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


class ImageTensorDataset(Dataset):
    """An in-memory image classification split: ``uint8`` images, ``int64`` targets, normalised on access.

    ``dataset[i]`` returns ``(image, label)`` with ``image`` a ``float32`` tensor ``(C, H, W)`` equal to
    ``(pixels / 255 - mean) / std`` and ``label`` a Python ``int``. For fast batching skip the per-item path:
    ``dataset.get_batch(indices, device)`` or ``dataset.normalize(dataset.images[idx].to(device))``.

    Attributes:
        images: ``uint8`` tensor ``(N, C, H, W)``.
        targets: ``int64`` tensor ``(N,)``.
        info: the :class:`DatasetInfo` of the data set.
        split: ``"train"`` or ``"test"``.
        source: where the data was read from (a path and its layout).
        exact: False if the images went through lossy (JPEG) compression, e.g. the CIFAR-10 JPEG copy.
        display_name: name to report results under, e.g. ``"CIFAR-10 (JPEG copy)"`` when ``exact`` is False.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        info: DatasetInfo,
        split: str = "train",
        source: str = "",
        exact: bool = True,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if targets.dim() != 1 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}")
        if images.shape[1] != len(info.mean):
            raise ValueError(f"images have {images.shape[1]} channels but {info.name} has {len(info.mean)}")
        self.images = images
        self.targets = targets.to(torch.int64)
        self.info = info
        self.split = split
        self.source = source
        self.exact = exact
        self.display_name = info.display_name if exact else f"{info.display_name} (JPEG copy)"
        mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)
        self.mean, self.std = mean, std
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].to(torch.float32).mul_(self._scale).add_(self._shift)
        return image, int(self.targets[index])

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise a ``uint8`` batch ``(..., C, H, W)`` on its own device: ``(x / 255 - mean) / std``."""
        scale = self._scale.to(images.device)
        shift = self._shift.to(images.device)
        return images.to(torch.float32) * scale + shift

    def get_batch(self, indices, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``float32`` images ``(B, C, H, W)`` and ``int64`` targets ``(B,)`` for ``indices`` (a
        tensor, list or slice), moved to ``device`` before normalising (so only ``uint8`` crosses the bus)."""
        images = self.images[indices]
        targets = self.targets[indices]
        if device is not None:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
        return self.normalize(images), targets

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.display_name}, split={self.split!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, source={self.source!r})"
        )


# --------------------------------------------------------------------------------------------- locating files


@dataclass
class _Found:
    kind: str  # "idx" | "cifar_pickle" | "imagefolder" | "archive"
    path: Path
    files: tuple[Path, ...] = field(default_factory=tuple)


def _project_shared_data() -> Path:
    # <checkout>/supermask_fx/data/vision.py -> <checkout>/../shared/data
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _standard_bases() -> list[tuple[Path, str]]:
    return [
        (Path("/usr/share/datasets"), "system"),
        (default_cache_dir() / "data", "download cache"),
        (_project_shared_data(), "project shared data"),
    ]


def search_locations(name: str, root: str | Path | None = None) -> list[tuple[Path, str]]:
    """The folders searched for data set ``name``, in order, each with a short description of why."""
    name = canonical_name(name)
    dirs: list[tuple[Path, str]] = []

    def add_base(base: Path, why: str, direct: bool) -> None:
        if direct:
            dirs.append((base, why))
        for sub in _SUBDIRS[name]:
            dirs.append((base / sub, why))
        if name == "cifar10" and not direct:
            dirs.append((base, f"{why}, archives only"))

    if root is not None:
        add_base(Path(root).expanduser(), "root=", direct=True)
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            add_base(Path(entry.strip()).expanduser(), f"${ENV_VAR}", direct=False)
    for d in _SYSTEM_DIRS.get(name, ()):
        dirs.append((d, "system package"))
    for base, why in _standard_bases():
        add_base(base, why, direct=False)
    seen: set[Path] = set()
    unique = []
    for d, why in dirs:
        if d not in seen:
            seen.add(d)
            unique.append((d, why))
    return unique


def _idx_names(split: str, what: str) -> list[str]:
    prefix = _IDX_PREFIX[split]
    ndim = 3 if what == "images" else 1
    names = []
    for stem in (f"{prefix}-{what}-idx{ndim}-ubyte", f"{prefix}-{what}.idx{ndim}-ubyte"):
        names += [stem, stem + ".gz"]
    return names


def _expected_files(name: str) -> str:
    if name in ("mnist", "fashion_mnist"):
        files = ", ".join(
            f"{p}-{w}-idx{3 if w == 'images' else 1}-ubyte.gz" for p in ("train", "t10k") for w in ("images", "labels")
        )
        return f"IDX files {files} (uncompressed also accepted)"
    return (
        "torchvision's pickle folder cifar-10-batches-py/ (data_batch_1 ... data_batch_5, test_batch), "
        "or an image folder train/<class>/*.jpg|png and test/<class>/*.jpg|png with class folders "
        + ", ".join(dataset_info(name).classes)
        + ", or a cifar*.tar.gz archive of either (e.g. cifar10-jpeg.tar.gz, cifar-10-python.tar.gz)"
    )


def _find_idx(d: Path, split: str) -> _Found | None:
    def first(what: str) -> Path | None:
        for n in _idx_names(split, what):
            if (d / n).is_file():
                return d / n
        return None

    images, labels = first("images"), first("labels")
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        have, missing = (labels, "images") if images is None else (images, "labels")
        raise DatasetFormatError(
            f"{have}: found, but the matching {missing} file is missing in {d} (expected one of "
            f"{', '.join(_idx_names(split, missing))})"
        )
    return _Found("idx", d, (images, labels))


def _find_archives(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(
        p
        for p in d.iterdir()
        if p.is_file() and p.name.lower().startswith("cifar") and p.name.lower().endswith((".tar.gz", ".tgz"))
    )


def _find_cifar(d: Path, split: str, archives_only: bool) -> _Found | None:
    if not archives_only:
        if any((d / n).is_file() for n in ("batches.meta", "data_batch_1", "test_batch")):
            return _Found("cifar_pickle", d)
        if find_split_root(d) == d:
            return _Found("imagefolder", d)
    archives = _find_archives(d)
    if archives:
        # prefer the bit-exact python pickles if both kinds of archive lie here
        archives.sort(key=lambda p: "python" not in p.name)
        return _Found("archive", archives[0])
    return None


def _locate(name: str, split: str, root) -> tuple[_Found | None, list[tuple[Path, str]]]:
    places = search_locations(name, root)
    for d, why in places:
        if name == "cifar10":
            archives_only = why.endswith("archives only")
            if not d.is_dir():
                continue
            found = _find_cifar(d, split, archives_only)
        else:
            found = _find_idx(d, split) if d.is_dir() else None
        if found is not None:
            return found, places
    return None, places


def is_available_offline(name: str, root: str | Path | None = None) -> bool:
    """Whether :func:`load_dataset` finds both splits of ``name`` locally (same search, nothing is read or
    downloaded). A malformed copy counts as available: loading it then raises its ``DatasetFormatError``."""
    name = canonical_name(name)
    try:
        return all(_locate(name, split, root)[0] is not None for split in SPLITS)
    except DatasetFormatError:
        return True


def local_copy_is_exact(name: str, root: str | Path | None = None) -> bool | None:
    """Whether the local copy :func:`load_dataset` would read is bit-exact, without decoding it: True for IDX
    files and CIFAR pickles (or an archive named like torchvision's ``cifar-10-python.tar.gz``), False for an
    image folder of JPEG/WebP files or another image archive (e.g. ``cifar10-jpeg.tar.gz``), None if there is no
    local copy. Results from a copy that is not exact are reported as e.g. "CIFAR-10 (JPEG copy)"."""
    name = canonical_name(name)
    try:
        found, _ = _locate(name, "train", root)
    except DatasetFormatError:
        return None
    if found is None:
        return None
    if found.kind == "archive":
        return "python" in found.path.name.lower()
    if found.kind != "imagefolder":
        return True
    split_dirs = [found.path / split for split in SPLITS if (found.path / split).is_dir()]
    for class_dir in sorted(p for d in split_dirs for p in d.iterdir() if p.is_dir()):
        for entry in os.scandir(class_dir):
            ext = os.path.splitext(entry.name)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                return ext not in _LOSSY_EXTENSIONS
    return True


def download_possible(name: str, timeout: float = 3.0) -> bool:
    """Whether ``load_dataset(name, download=True)`` could download ``name`` now: torchvision is installed and
    the host of its download URL answers a TCP connection within ``timeout`` seconds (name lookup included)."""
    import threading
    from urllib.parse import urlsplit

    name = canonical_name(name)
    try:
        import torchvision.datasets as tvd
    except ImportError:
        return False
    cls = getattr(tvd, _TORCHVISION_CLASS[name], None)
    url = getattr(cls, "url", None) or next(iter(getattr(cls, "mirrors", None) or ()), None)
    if not url:
        return False
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    reached: list[bool] = []

    def probe() -> None:
        import socket

        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # a stuck name lookup ignores the socket timeout
    thread.start()
    thread.join(timeout)
    return bool(reached)


# ------------------------------------------------------------------------------------------- reading layouts


def _load_idx_split(found: _Found, info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = found.files
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    s = info.image_size
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (s, s):
        raise DatasetFormatError(
            f"{images_path}: expected uint8 images of shape (N, {s}, {s}), got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise DatasetFormatError(
            f"{labels_path}: expected a 1-D uint8 label file, got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DatasetFormatError(
            f"{labels_path}: {labels.shape[0]} labels but {images_path.name} has {images.shape[0]} images"
        )
    return images.unsqueeze(1), labels.to(torch.int64)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batch files: only the numpy array reconstruction helpers may be loaded."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np  # only needed for the pickle layout (the pickles contain numpy arrays)

    if not path.is_file():
        raise DatasetFormatError(f"{path}: CIFAR batch file missing (folder {path.parent} is incomplete)")
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise DatasetFormatError(f"{path}: not a readable CIFAR batch pickle ({exc})") from exc
    if not isinstance(batch, dict) or "data" not in batch or ("labels" not in batch and "fine_labels" not in batch):
        raise DatasetFormatError(f"{path}: CIFAR batch lacks the 'data'/'labels' entries")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch.get("labels", batch.get("fine_labels")))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DatasetFormatError(f"{path}: {labels.shape} labels for {data.shape[0]} images")
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64))


def _load_cifar_pickle(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_cifar_batch(folder / n) for n in _CIFAR_BATCHES[split]]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _load_cifar_found(
    found: _Found, split: str, info: DatasetInfo, root
) -> tuple[torch.Tensor, torch.Tensor, bool, str]:
    if found.kind == "archive":
        extracted = extract_archive(found.path, root=root)
        pickles = [extracted, extracted / "cifar-10-batches-py"] + [p for p in extracted.iterdir() if p.is_dir()]
        for p in pickles:
            if (p / "data_batch_1").is_file() or (p / "test_batch").is_file():
                images, targets = _load_cifar_pickle(p, split)
                return images, targets, True, f"{p} (CIFAR pickles from {found.path.name})"
        folder = find_split_root(extracted)
        if folder is None:
            raise DatasetFormatError(
                f"{found.path}: archive holds neither cifar-10-batches-py/ nor train/<class>/, test/<class>/ "
                f"(extracted to {extracted})"
            )
        found = _Found("imagefolder", folder)
    if found.kind == "cifar_pickle":
        images, targets = _load_cifar_pickle(found.path, split)
        return images, targets, True, f"{found.path} (CIFAR pickles)"
    split_dir = found.path / split
    loaded = load_image_folder(split_dir, classes=info.classes, mode="RGB", image_size=info.image_size)
    return loaded.images, loaded.targets, not loaded.lossy, f"{split_dir} (image folder)"


# --------------------------------------------------------------------------------------------- download


def _download_root(root) -> Path:
    if root is not None:
        return Path(root).expanduser()
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            return Path(entry.strip()).expanduser()
    return default_cache_dir() / "data"


def _download(name: str, split: str, root) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Download with torchvision; raises RuntimeError with a one-line reason on failure."""
    try:
        import torchvision.datasets as tvd
    except ImportError as exc:
        raise RuntimeError(f"torchvision is not installed (pip install torchvision): {exc}") from exc
    target = _download_root(root)
    cls = getattr(tvd, _TORCHVISION_CLASS[name])
    try:
        target.mkdir(parents=True, exist_ok=True)
        ds = cls(str(target), train=(split == "train"), download=True)
    except Exception as exc:
        raise RuntimeError(
            f"torchvision.datasets.{cls.__name__}(root={str(target)!r}, download=True) failed: {exc}"
        ) from exc
    data, labels = ds.data, ds.targets
    images = torch.as_tensor(data)
    if images.dim() == 3:  # MNIST-like (N, H, W)
        images = images.unsqueeze(1)
    else:  # CIFAR: numpy (N, H, W, C)
        images = images.permute(0, 3, 1, 2)
    return (
        images.to(torch.uint8).contiguous(),
        torch.as_tensor(labels, dtype=torch.int64),
        f"{target} (torchvision download)",
    )


def _not_found_message(name: str, split: str, places, download_note: str) -> str:
    info = dataset_info(name)
    lines = [
        f"Dataset {name!r} ({info.display_name}, split {split!r}) was not found locally.",
        "Searched, in order:",
    ]
    for d, why in places:
        state = "" if d.exists() else "  [does not exist]"
        lines.append(f"  - {d}  ({why}){state}")
    lines.append(f"Expected: {_expected_files(name)}.")
    lines.append("How to get it:")
    subdirs = ", ".join(s + "/" for s in _SUBDIRS[name])
    if name == "fashion_mnist":
        lines.append(
            "  - sudo apt-get install dataset-fashion-mnist   "
            "(Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist/)"
        )
    if name == "cifar10":
        lines.append(
            "  - put the cifar-10-batches-py/ folder (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)"
            " or a cifar10-jpeg.tar.gz image-folder archive in one of the folders above"
        )
    lines.append(
        f"  - pass root=<folder> holding the files above (directly, or in one of the sub-folders {subdirs}), "
        f"or set {ENV_VAR}=<folder> to a folder holding one of those sub-folders"
    )
    lines.append(
        "  - or call load_dataset(..., download=True) while online (needs torchvision: pip install torchvision)"
    )
    lines.append(f"Download: {download_note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- public API


def load_dataset(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    download: bool = True,
    limit: int | None = None,
) -> ImageTensorDataset:
    """Load a split of ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"`` into memory.

    Args:
        name: data set name (see :data:`~supermask_fx.data.DATASET_NAMES`; ``-``/``_`` and case do not
            matter).
        split: ``"train"`` or ``"test"``.
        root: folder to search first (files directly in it or in the usual sub-folders, see the module
            docstring); also where a download goes. Files directly in ``root`` are taken as the requested
            data set without further checks (MNIST and Fashion-MNIST use the same file names).
        download: if no local copy is found, download it with torchvision.
        limit: keep only the first ``limit`` examples of the split, in stored order (no resampling). The first
            examples are close to balanced: the MNIST files are shuffled (their first 1000 training labels have 85
            to 126 per class) and image folders are stored class-interleaved (1st image of each class, then the
            2nd, ...).

    Returns:
        An :class:`ImageTensorDataset` with ``uint8`` ``.images`` ``(N, C, H, W)`` and ``int64``
        ``.targets``; items are ``(float32 normalised image, int label)``. For CIFAR-10 read from the JPEG
        image-folder copy, ``.exact`` is False and ``.display_name`` is ``"CIFAR-10 (JPEG copy)"``.

    Raises:
        DatasetNotFoundError: no local copy, and downloading was disabled or failed. The message lists every
            place searched, the expected files and how to get them.
        DatasetFormatError: a file was found but is malformed (names the file and the problem).
        ValueError: unknown name or split, or ``limit < 1``.
    """
    name = canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be a positive integer or None (got {limit!r})")
    info = dataset_info(name)

    found, places = _locate(name, split, root)
    exact = True
    if found is not None:
        if name == "cifar10":
            images, targets, exact, source = _load_cifar_found(found, split, info, root)
        else:
            images, targets = _load_idx_split(found, info)
            source = f"{found.path} (IDX)"
    elif not download:
        raise DatasetNotFoundError(_not_found_message(name, split, places, "not attempted (download=False)"))
    else:
        try:
            images, targets, source = _download(name, split, root)
        except RuntimeError as exc:
            raise DatasetNotFoundError(_not_found_message(name, split, places, f"failed: {exc}")) from exc

    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= info.num_classes):
        raise DatasetFormatError(
            f"{source}: labels must lie in [0, {info.num_classes - 1}], found "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    if limit is not None and int(limit) < images.shape[0]:
        images = images[: int(limit)].clone()
        targets = targets[: int(limit)].clone()
    return ImageTensorDataset(images, targets, info, split=split, source=source, exact=exact)
