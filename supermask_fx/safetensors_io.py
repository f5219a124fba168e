"""A minimal reader and writer of the safetensors format (no pickle), so the core needs nothing but torch.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length ``N``; ``N`` bytes of
JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) plus an optional ``"__metadata__"`` string-to-string map; then the data section. Files written here
load with the ``safetensors`` package and vice versa.

Checksums (optional, both SHA-256, stored as metadata): of the data section (``checksum_key``), and of the header
(``header_checksum_key``) in a canonical form, ``header_sha256``: the parsed JSON header without that one key,
serialized with sorted keys, no whitespace and ASCII escapes. A header that parses to the same JSON (other
whitespace or padding) has the same checksum; any other change to it does not.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from .atomic import atomic_file

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_BY_NAME = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """The file is not a readable safetensors file: truncated, corrupted or not safetensors at all."""


def tensor_bytes(t: Tensor) -> bytes:
    """The raw little-endian bytes of ``t`` in row-major order (one memcpy; no numpy needed)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def write(
    path: str | os.PathLike,
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    checksum_key: str | None = None,
    header_checksum_key: str | None = None,
) -> int:
    """Write atomically: a temporary file in the same folder, fsync, then rename over ``path``.

    With ``checksum_key``, the SHA-256 of the data section is stored under that metadata key; with
    ``header_checksum_key``, the SHA-256 of the rest of the header (``header_sha256``), data checksum included.

    A crash or a full disk mid-write never leaves a partial file under ``path``, and an existing file there is
    untouched until the new one is complete. Returns the file size in bytes.
    """
    header: dict = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise TypeError(f"cannot store {name!r} of dtype {t.dtype} in safetensors")
        blob = tensor_bytes(t)
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if checksum_key is not None:
        digest = hashlib.sha256()
        for blob in blobs:
            digest.update(blob)
        metadata = {**metadata, checksum_key: digest.hexdigest()}
    metadata = dict(metadata)
    header["__metadata__"] = metadata
    if header_checksum_key is not None:
        metadata[header_checksum_key] = header_sha256(header, header_checksum_key)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_file(path) as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
    return 8 + len(encoded) + offset


def header_sha256(header: dict, checksum_key: str) -> str:
    """SHA-256 of a parsed header (tensor entries and ``__metadata__``) without ``__metadata__[checksum_key]``,
    serialized canonically: ``json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``."""
    metadata = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != checksum_key}
    canonical = {**header, "__metadata__": metadata}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str], bytes]:
    """Return (tensors, metadata, raw data section). Raises ``SafetensorsError`` naming what is wrong."""
    tensors, header, body = read_with_header(path)
    return tensors, header.get("__metadata__", {}), body


def read_with_header(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict, bytes]:
    """Return (tensors, the parsed JSON header, raw data section); ``header["__metadata__"]`` is always there (a
    dict of strings, empty if the file has none). Raises ``SafetensorsError`` naming what is wrong, ``OSError``
    if the file cannot be read."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise SafetensorsError(f"{path}: only {len(data)} bytes, truncated (a safetensors file starts with 8 bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise SafetensorsError(f"{path}: header claims {size} bytes but the file has {len(data) - 8}: truncated")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SafetensorsError(f"{path}: header is not valid JSON ({error}): not safetensors, or corrupted") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    body = data[8 + size :]
    metadata = header.get("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: header's __metadata__ is not a map of strings: corrupted")
    header["__metadata__"] = metadata
    tensors = {}
    for name, info in header.items():
        if name != "__metadata__":
            tensors[name] = _tensor(path, name, info, body)
    return tensors, header, body


def _tensor(path, name: str, info, body: bytes) -> Tensor:
    """The tensor a header entry describes, checked against the data section."""
    try:
        dtype = _BY_NAME[info["dtype"]]
        shape = [_count(d) for d in info["shape"]]
        begin, end = (_count(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: malformed header entry for {name!r}: {info!r}") from None
    numel = 1
    for d in shape:
        numel *= d
    if end > len(body):
        raise SafetensorsError(f"{path}: tensor {name!r} ends at byte {end}, data has {len(body)}: truncated")
    if end - begin != numel * torch.empty((), dtype=dtype).element_size():
        raise SafetensorsError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(body[begin:end]), dtype=dtype).reshape(shape)


def _count(value) -> int:
    """A JSON shape entry or offset: a non-negative integer (not a bool, a float or a string)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value
