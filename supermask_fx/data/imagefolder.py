"""Image-folder data sets (``<root>/<split>/<class>/<image>``), archive extraction and a decoded-tensor cache.

Decoding tens of thousands of small JPEG/PNG files takes a while, so the decoded ``uint8`` tensors of a split
are cached in a ``.pt`` file (written atomically) and reused while the folder's file list, sizes and
modification times are unchanged. Archives are extracted once. Both go to the library's cache folder
(``supermask_fx.cache.default_cache_dir()``: ``$SUPERMASK_FX_CACHE``, else ``$XDG_CACHE_HOME/supermask_fx``,
else ``~/.cache/supermask_fx``), never into the folder that holds the data, and the first load says where on
stderr. PIL (Pillow) is imported lazily and is only needed for this layout.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DatasetFormatError, DatasetNotFoundError
from .paths import atomic_torch_save, chmod_default, default_cache_dir, is_writable_dir

__all__ = [
    "ARCHIVE_SUFFIXES",
    "IMAGE_EXTENSIONS",
    "ImageFolderSplit",
    "extract_archive",
    "find_split_root",
    "load_image_folder",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"})
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_LOSSY_EXTENSIONS = frozenset({".jpg", ".jpeg", ".webp"})
_CACHE_VERSION = 2  # 2: examples stored class-interleaved (see _interleave_classes)
_MARKER = ".supermask_fx-extracted"
_MODES = {"L": 1, "RGB": 3}


@dataclass
class ImageFolderSplit:
    """One decoded split of an image folder.

    Attributes:
        images: ``uint8`` tensor ``(N, C, H, W)``.
        targets: ``int64`` tensor ``(N,)``; label = index of the class folder in ``classes``.
        classes: class folder names in label order.
        lossy: True if any image is JPEG/WebP (the data is then not bit-exact w.r.t. a lossless original).
        cache_path: the ``.pt`` cache that was read or written (None if caching was off or impossible).
        from_cache: True if the tensors came from the cache file.
    """

    images: torch.Tensor
    targets: torch.Tensor
    classes: tuple[str, ...]
    lossy: bool
    cache_path: Path | None
    from_cache: bool


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _scan(split_dir: Path, classes: Sequence[str] | None):
    """List ``(path, label)`` pairs in label then file-name order, and a fingerprint of the listing."""
    if not split_dir.is_dir():
        raise DatasetFormatError(f"{split_dir}: split folder missing (expected <root>/{split_dir.name}/<class>/)")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and _visible(e.name))
    if classes is None:
        classes = tuple(found)
        if not classes:
            raise DatasetFormatError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    else:
        classes = tuple(classes)
        missing = [c for c in classes if c not in found]
        if missing:
            raise DatasetFormatError(
                f"{split_dir}: class folder(s) missing: {', '.join(missing)} "
                f"(expected one folder per class: {', '.join(classes)})"
            )
        extra = [c for c in found if c not in classes]
        if extra:
            raise DatasetFormatError(
                f"{split_dir}: unexpected class folder(s): {', '.join(extra)} (expected exactly: {', '.join(classes)})"
            )
    items: list[tuple[Path, int]] = []
    digest = hashlib.sha1()
    lossy = False
    for label, cls in enumerate(classes):
        cdir = split_dir / cls
        entries = sorted(
            (e for e in os.scandir(cdir) if e.is_file() and _visible(e.name)),
            key=lambda e: e.name,
        )
        n_before = len(items)
        for e in entries:
            ext = os.path.splitext(e.name)[1].lower()
            if ext not in IMAGE_EXTENSIONS:
                continue
            lossy = lossy or ext in _LOSSY_EXTENSIONS
            st = e.stat()
            digest.update(f"{label}\0{cls}/{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            items.append((Path(e.path), label))
        if len(items) == n_before:
            raise DatasetFormatError(
                f"{cdir}: class folder has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
    return classes, _interleave_classes(items), digest.hexdigest(), lossy


def _interleave_classes(items: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
    """Order examples round-robin over classes (1st of each class, then 2nd, ...), file order within a class.

    Image folders are sorted by class on disk; interleaving makes the first N examples (``limit=N``) cover every
    class about equally, as the first N examples of the MNIST files do.
    """
    rank: dict[int, int] = {}
    keyed = []
    for position, (path, label) in enumerate(items):
        keyed.append((rank.get(label, 0), label, position, path))
        rank[label] = rank.get(label, 0) + 1
    return [(path, label) for _, label, _, path in sorted(keyed)]


def _cache_file(split_dir: Path, mode: str, cache_dir: Path | None) -> Path:
    """The decoded cache of ``split_dir``: in ``cache_dir`` (default ``<cache>/imagefolder``), named by a hash of
    the folder's absolute path, never beside the data."""
    name = f"{split_dir.name}-{mode}.supermask_fx.pt"
    key = hashlib.sha1(str(split_dir.resolve()).encode()).hexdigest()[:16]
    return (cache_dir or default_cache_dir() / "imagefolder") / f"{key}-{name}"


def _say(message: str) -> None:
    """One line on stderr: where the library wrote something the user did not ask for by name."""
    print(f"supermask_fx: {message}", file=sys.stderr, flush=True)


def _try_load_cache(path: Path, fingerprint: str, classes: tuple[str, ...]):
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # corrupt: rebuild
        warnings.warn(f"ignoring unreadable image cache {path}: {exc}", stacklevel=3)
        return None
    if (
        not isinstance(blob, dict)
        or blob.get("version") != _CACHE_VERSION
        or blob.get("fingerprint") != fingerprint
        or tuple(blob.get("classes", ())) != classes
    ):
        return None
    return blob


def _decode_all(items: list[tuple[Path, int]], mode: str, image_size: int | None) -> torch.Tensor:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading image folders needs Pillow: pip install pillow") from exc

    channels = _MODES[mode]
    buf: bytearray | None = None
    size = image_size
    stride = 0
    for i, (path, _) in enumerate(items):
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                w, h = im.size
                data = im.tobytes()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DatasetFormatError(f"{path}: cannot decode image ({exc})") from exc
        if size is None:
            size = w
        if (w, h) != (size, size):
            raise DatasetFormatError(f"{path}: image is {w}x{h}, expected {size}x{size}")
        if buf is None:
            stride = size * size * channels
            buf = bytearray(stride * len(items))
        buf[i * stride : (i + 1) * stride] = data
    assert buf is not None and size is not None
    hwc = torch.frombuffer(buf, dtype=torch.uint8).view(len(items), size, size, channels)
    return hwc.permute(0, 3, 1, 2).contiguous()


def load_image_folder(
    split_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    mode: str = "RGB",
    image_size: int | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> ImageFolderSplit:
    """Decode every image of ``split_dir/<class>/<file>`` into one ``uint8`` tensor ``(N, C, H, W)``.

    Args:
        split_dir: folder with one sub-folder per class (e.g. ``cifar10/train``). Hidden files/folders and
            files without an image extension are ignored.
        classes: expected class folder names in label order. A missing or unexpected class folder raises
            :class:`DatasetFormatError`. If None, the sorted sub-folder names are used.
        mode: PIL mode the images are converted to: ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
        image_size: required height = width; if None, taken from the first image. Every image must match.
        cache: read/write the decoded tensors from/to
            ``<cache_dir>/<hash of split_dir>-<split>-<mode>.supermask_fx.pt``: nothing is written into or beside
            ``split_dir`` (a cache that earlier versions wrote beside it,
            ``<split_dir>/../<split>-<mode>.supermask_fx.pt``, is still read). The cache is invalidated when the
            list of files, their sizes or modification times change. The first write says where on stderr; a cache
            folder that cannot be written is a warning, and the images are decoded again next time.
        cache_dir: the cache folder (default ``<supermask_fx cache>/imagefolder``, see
            :func:`supermask_fx.cache.default_cache_dir`: ``$SUPERMASK_FX_CACHE`` moves it).

    Raises:
        DatasetFormatError: missing split/class folder, empty class folder, undecodable image, wrong size.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)} (got {mode!r})")
    split_dir = Path(split_dir)
    classes_t, items, fingerprint, lossy = _scan(split_dir, classes)
    fingerprint = hashlib.sha1(f"{fingerprint}|{mode}|{image_size}".encode()).hexdigest()
    path = _cache_file(split_dir, mode, Path(cache_dir) if cache_dir else None) if cache else None
    # read only: where versions before this one wrote the cache, beside the split folder
    earlier = split_dir.parent / f"{split_dir.name}-{mode}.supermask_fx.pt"
    for candidate in (path, earlier) if path is not None else ():
        blob = _try_load_cache(candidate, fingerprint, classes_t)
        if blob is not None:
            return ImageFolderSplit(
                images=blob["images"],
                targets=blob["targets"],
                classes=classes_t,
                lossy=bool(blob["lossy"]),
                cache_path=candidate,
                from_cache=True,
            )
    images = _decode_all(items, mode, image_size)
    targets = torch.tensor([label for _, label in items], dtype=torch.int64)
    written = None
    if path is not None:
        blob = {
            "version": _CACHE_VERSION,
            "fingerprint": fingerprint,
            "classes": list(classes_t),
            "lossy": lossy,
            "images": images,
            "targets": targets,
        }
        try:
            if not is_writable_dir(path.parent):
                raise PermissionError(f"{path.parent} is not writable")
            atomic_torch_save(blob, path)
        except OSError as exc:
            warnings.warn(
                f"could not write image cache {path}: {exc}; the images of {split_dir} will be decoded again next "
                "time (set SUPERMASK_FX_CACHE to a writable folder)",
                stacklevel=2,
            )
        else:
            written = path
            megabytes = (images.numel() + targets.numel() * 8) / 1e6
            _say(f"decoded {len(targets):,} images of {split_dir} and cached them in {path} ({megabytes:.0f} MB)")
    return ImageFolderSplit(images, targets, classes_t, lossy, written, from_cache=False)


def find_split_root(folder: Path, splits: Sequence[str] = ("train", "test")) -> Path | None:
    """Return ``folder`` if it has one of ``splits`` as a sub-folder, else its only visible sub-folder if that
    one does (archives often wrap everything in one top folder), else None."""
    folder = Path(folder)
    if any((folder / s).is_dir() for s in splits):
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and _visible(p.name)] if folder.is_dir() else []
    if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in splits):
        return subdirs[0]
    return None


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _archive_id(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"


def _extracted_ok(target: Path, ident: str) -> bool:
    marker = target / _MARKER
    try:
        return marker.read_text() == ident
    except OSError:
        return False


def _safe_extractall(tf: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
        tf.extractall(dest, filter="data")
        return
    members = []
    for m in tf.getmembers():  # older Pythons: only plain files and folders inside dest
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
            raise tarfile.TarError(f"refusing to extract unsafe member {m.name!r}")
        members.append(m)
    tf.extractall(dest, members=members)


def extract_archive(archive: str | Path, *, root: str | Path | None = None) -> Path:
    """Extract a ``.tar.gz``/``.tgz``/``.tar`` archive once and return the extraction folder.

    The archive is extracted into the library's cache folder, ``<cache>/extracted/<stem>-<hash>/`` (see
    :func:`supermask_fx.cache.default_cache_dir`; ``$SUPERMASK_FX_CACHE`` moves it), never beside the archive or
    into ``root``: a data folder stays as its owner left it. A complete earlier extraction of the same archive is
    reused, also one that earlier versions of this library left in ``<archive dir>/<stem>/`` or
    ``<root>/<stem>/`` (read only). Extraction goes to a temporary folder that is renamed into place when
    complete, a marker file records which archive (path, size, mtime) it came from, and a line on stderr says
    where it went. Members are extracted with tarfile's ``"data"`` filter (no absolute paths, links out of the
    folder or device files).

    Raises:
        DatasetFormatError: the archive is corrupt.
        DatasetNotFoundError: the cache folder cannot be written.
    """
    archive = Path(archive)
    stem = _archive_stem(archive)
    ident = _archive_id(archive)
    key = hashlib.sha1(ident.encode()).hexdigest()[:12]
    target = default_cache_dir() / "extracted" / f"{stem}-{key}"
    earlier = [archive.parent / stem] + ([Path(root).expanduser() / stem] if root is not None else [])
    for folder in [target, *earlier]:
        if _extracted_ok(folder, ident):
            return folder
    how = (
        f"extract it yourself (tar xzf {archive} -C DIR) and pass DIR as root=, or set SUPERMASK_FX_CACHE to a "
        "writable folder"
    )
    if not is_writable_dir(target.parent):
        raise DatasetNotFoundError(f"cannot extract {archive}: the cache folder {target.parent} is not writable; {how}")
    try:
        if target.exists():  # ours (the cache), but incomplete or of another archive: replaced
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.partial-", dir=target.parent))
    except OSError as exc:
        raise DatasetNotFoundError(f"cannot extract {archive} into {target}: {exc}; {how}") from exc
    _say(f"extracting {archive} (once) into {target}")
    try:
        with tarfile.open(archive) as tf:
            _safe_extractall(tf, tmp)
        (tmp / _MARKER).write_text(ident)
        chmod_default(tmp, directory=True)
        os.replace(tmp, target)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetFormatError(f"{archive}: corrupt or unreadable archive ({exc})") from exc
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _extracted_ok(target, ident):  # another process finished first
            return target
        raise DatasetNotFoundError(f"cannot extract {archive} into {target}: {exc}; {how}") from exc
    return target
