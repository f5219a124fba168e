"""Compiled passes of the CPU top-k (``band.c``), built on first use with the system C compiler.

Nothing here changes a result: ``band.c`` computes the same comparisons as the pure-PyTorch ``band``
strategy, fused into one pass that also writes the cached ``w * mask`` and ``w * sign(s)`` (three to five
elementwise passes become about one). Where no compiler is found, the build fails, or
``SUPERMASK_FX_NATIVE=0`` is set, ``kernel()`` returns ``None`` and the selector uses the pure-PyTorch path;
``unavailable_reason()`` says why.

The shared library is compiled once per source, compiler and machine type into
``<cache>/native/band-<hash>.so`` (``<cache>`` is ``supermask_fx.data.default_cache_dir()``, i.e.
``$SUPERMASK_FX_CACHE`` or ``~/.cache/supermask_fx``), written atomically, and loaded with ``ctypes`` (whose
foreign calls release the GIL). It uses plain pthreads, not OpenMP, so it never brings a second OpenMP runtime
into a process that already has PyTorch's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["BandKernel", "kernel", "unavailable_reason", "float_bits"]

_SOURCE = Path(__file__).with_name("band.c")
_FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing")
_lock = threading.Lock()
_state: dict[str, object] = {}


class BandKernel:
    """ctypes wrappers of ``band.c``. Segment tables hold raw pointers: keep the tensors alive during calls."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        p, i64, u32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int
        for name in ("sfx_chunk_count", "sfx_band_capacity"):
            getattr(lib, name).argtypes = [p, i64]
            getattr(lib, name).restype = i64
        lib.sfx_band_pass.argtypes = [p, i64, u32, u32, p, p, p, c_int]
        lib.sfx_band_pass.restype = None
        lib.sfx_band_collect.argtypes = [p, i64, u32, u32, p, p, p, p, c_int]
        lib.sfx_band_collect.restype = None
        self.lib = lib

    def scratch(self, table: Tensor, previous: Tensor | None = None) -> Tensor:
        """The int64 scratch ``band_pass`` needs for ``table`` (about one slot per 8 scores); ``previous`` if
        it is one and large enough."""
        need = int(self.lib.sfx_band_capacity(table.data_ptr(), table.shape[0]))
        if previous is not None and previous.dtype == torch.int64 and previous.numel() >= need:
            return previous
        return torch.empty(need, dtype=torch.int64)

    @staticmethod
    def table(scores: list[Tensor], weights: list[Tensor], masks: list[Tensor], effective, signed) -> Tensor:
        """The (segments, 6) int64 table of ``band.c``: pointers to scores, weight, mask, effective, signed and
        the length. ``effective`` / ``signed``: lists with ``None`` entries, or ``None``: not written (signed
        only where effective is written). Tensors: contiguous CPU float32 (masks bool), equal sizes per row."""

        def pointer(group, g):
            return 0 if group is None or group[g] is None else group[g].data_ptr()

        rows = [
            [s.data_ptr(), w.data_ptr(), m.data_ptr(), pointer(effective, g), pointer(signed, g), s.numel()]
            for g, (s, w, m) in enumerate(zip(scores, weights, masks))
        ]
        return torch.tensor(rows, dtype=torch.int64)

    def band_pass(self, table: Tensor, lo: int, hi: int, scratch: Tensor, threads: int) -> tuple[Tensor, Tensor]:
        """One fused pass; returns per-segment counts (segments, 2: ``>= hi``, in ``[lo, hi)``) and the
        per-chunk band counts that ``band_collect`` needs (the band indices wait in ``scratch``)."""
        nseg = table.shape[0]
        counts = torch.empty(nseg, 2, dtype=torch.int64)
        chunk_band = torch.empty(int(self.lib.sfx_chunk_count(table.data_ptr(), nseg)), dtype=torch.int64)
        self.lib.sfx_band_pass(
            table.data_ptr(), nseg, lo, hi, counts.data_ptr(), chunk_band.data_ptr(), scratch.data_ptr(), threads
        )
        return counts, chunk_band

    def band_collect(
        self, table: Tensor, lo: int, hi: int, chunk_band: Tensor, scratch: Tensor, total: int, threads: int
    ) -> Tensor:
        """Flat indices (within each segment) of the entries in ``[lo, hi)``, segment after segment, after
        ``band_pass`` with the same arguments."""
        out = torch.empty(total, dtype=torch.int64)
        chunk_out = torch.empty_like(chunk_band)
        self.lib.sfx_band_collect(
            table.data_ptr(),
            table.shape[0],
            lo,
            hi,
            chunk_band.data_ptr(),
            scratch.data_ptr(),
            chunk_out.data_ptr(),
            out.data_ptr(),
            threads,
        )
        return out


def float_bits(value: float) -> int:
    """The float32 bit pattern of ``value`` as an unsigned int, for comparisons against ``|s|``'s bits:
    0 for ``value <= 0`` (every magnitude qualifies), the pattern of +inf for ``value = inf``."""
    if value <= 0.0:
        return 0
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32))


def kernel() -> BandKernel | None:
    """The compiled kernel, building it on first use; ``None`` if it cannot be had (see ``unavailable_reason``)."""
    if "kernel" not in _state:
        with _lock:
            if "kernel" not in _state:
                _state["kernel"], _state["reason"] = _load()
    return _state["kernel"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why ``kernel()`` is ``None`` (``None`` when it is available)."""
    kernel()
    return _state["reason"]  # type: ignore[return-value]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _load() -> tuple[BandKernel | None, str | None]:
    if os.environ.get("SUPERMASK_FX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by SUPERMASK_FX_NATIVE=0"
    if platform.system() == "Windows":
        return None, "the compiled top-k is built on POSIX systems only"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc/clang)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot run the C compiler {cc}: {exc}"
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(_FLAGS).encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    try:
        path = _build(cc, digest)
        return BandKernel(ctypes.CDLL(str(path))), None
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"building {_SOURCE.name} failed: {exc}"


def _build(cc: str, digest: str) -> Path:
    from ..data.paths import default_cache_dir, is_writable_dir

    folder = default_cache_dir() / "native"
    if not is_writable_dir(folder):
        folder = Path(tempfile.gettempdir()) / f"supermask_fx-native-{os.getuid()}"
    target = folder / f"band-{digest}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise OSError(f"{cc} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: concurrent builders each put a complete file in place
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
