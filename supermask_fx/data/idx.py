"""A small reader for the IDX format of (Fashion-)MNIST, gzip-compressed or not. No torchvision needed.

IDX layout: two zero bytes, a type code byte (0x08 = uint8, ...), the number of dimensions ``ndim``, then
``ndim`` big-endian uint32 sizes, then the data in C order, big-endian.
"""

from __future__ import annotations

import gzip
import math
import struct
import sys
import zlib
from pathlib import Path

import torch

from .errors import DatasetFormatError

__all__ = ["read_idx"]

_IDX_TYPES: dict[int, tuple[torch.dtype, int]] = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}


def _open(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_exact(f, n: int, path: Path, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            break
        got += k
    if got != n:
        raise DatasetFormatError(f"{path}: truncated IDX file: {what} has {got} of {n} expected bytes")
    return buf


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (optionally gzip-compressed, detected by content) into a tensor of its shape.

    Raises:
        DatasetFormatError: bad magic/type code, truncated header or data, trailing bytes, or corrupt gzip
            stream. The message names the file.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            header = f.read(4)
            if len(header) < 4:
                raise DatasetFormatError(f"{path}: truncated IDX file: header has {len(header)} of 4 bytes")
            if header[0] != 0 or header[1] != 0 or header[2] not in _IDX_TYPES:
                raise DatasetFormatError(
                    f"{path}: not an IDX file: bad magic number 0x{header.hex()} (expected 0x0000, a type "
                    f"code in {{{', '.join(f'0x{t:02x}' for t in _IDX_TYPES)}}} and the number of dimensions)"
                )
            dtype, itemsize = _IDX_TYPES[header[2]]
            ndim = header[3]
            if ndim == 0:
                raise DatasetFormatError(f"{path}: IDX header declares 0 dimensions")
            dims = struct.unpack(f">{ndim}I", bytes(_read_exact(f, 4 * ndim, path, "dimension header")))
            nbytes = math.prod(dims) * itemsize
            buf = _read_exact(f, nbytes, path, f"data for shape {tuple(dims)}")
            if f.read(1):
                raise DatasetFormatError(
                    f"{path}: malformed IDX file: extra bytes after the {nbytes} data bytes of shape {tuple(dims)}"
                )
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    if nbytes == 0:
        return torch.empty(dims, dtype=dtype)
    if itemsize == 1:
        return torch.frombuffer(buf, dtype=dtype).view(dims)
    raw = torch.frombuffer(buf, dtype=torch.uint8).view(-1, itemsize)
    if sys.byteorder == "little":
        raw = raw.flip(1)
    return raw.contiguous().view(dtype).view(dims)
