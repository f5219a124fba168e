"""Compiled CPU passes of edge-popup (``band.c``): the top-k and the score gradient, built on first use with the
system C compiler.

Nothing here changes a result: ``band.c`` computes the same mask as the pure-PyTorch ``band`` strategy (the
top-``kept`` of ``|s|``, ties in flat order, NaN below every number), and the same score gradient
``g * w * sign(s)`` as PyTorch's elementwise ops, in one pass instead of three. One top-k call serves every
stale layer of a model: a first pass, threaded over chunks of all the layers, writes the mask and ``w * mask``
and gathers the scores inside each layer's band; then each layer's threshold is found by a radix select over
its band alone (three to five elementwise passes per layer, plus Python overhead per layer, become about one
pass over the model). Where no compiler is found, the build fails, or ``SUPERMASK_FX_NATIVE=0`` is set,
``kernel()`` returns ``None`` and the selector uses the pure-PyTorch path; ``unavailable_reason()`` says why.

The shared library is compiled once per source, compiler, machine type and thread pool into
``<cache>/native/band-<hash>.so`` (``<cache>`` is ``supermask_fx.cache.default_cache_dir()``, i.e.
``$SUPERMASK_FX_CACHE`` or ``~/.cache/supermask_fx``), written atomically, and loaded with ``ctypes`` (whose
foreign calls release the GIL).

Threads: where PyTorch's parallel loops run on GNU OpenMP (``libgomp``, the case of the Linux wheels) and the
compiler is GCC, ``band.c`` is built with ``-fopenmp`` and linked against the very ``libgomp`` file this process
already has loaded, so its loops run on PyTorch's own thread pool: no second OpenMP runtime, no extra threads.
Otherwise it starts plain pthreads per call. On a 2-core VM, per-call pthreads made the convolutions after each
call 10-25 % slower (the scheduler moved PyTorch's workers about) and a ResNet-18 edge-popup step 1.16x a dense
step; sharing the pool brought it to 1.06x. ``thread_pool()`` says which build is loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "NativeKernel",
    "kernel",
    "unavailable_reason",
    "thread_pool",
    "order_key",
    "from_order_key",
    "to_float32",
    "INF_KEY",
]

_SOURCE = Path(__file__).with_name("band.c")
_FLAGS = ("-O3", "-fPIC", "-pthread", "-fno-strict-aliasing")
_lock = threading.Lock()
_state: dict[str, object] = {}


class NativeKernel:
    """ctypes wrapper of ``band.c``. The tables hold raw pointers: keep the tensors alive during a call."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.sfx_topk.argtypes = [p, i64, p, i64, ctypes.c_int]
        lib.sfx_topk.restype = ctypes.c_int
        lib.sfx_straight_through.argtypes = [p, p, p, p, i64, ctypes.c_int]
        lib.sfx_straight_through.restype = None
        lib.sfx_apply_mask.argtypes = [p, p, p, i64, ctypes.c_int]
        lib.sfx_apply_mask.restype = None
        lib.sfx_apply_bits.argtypes = [p, p, p, i64, ctypes.c_int]
        lib.sfx_apply_bits.restype = None
        lib.sfx_unpack_bits.argtypes = [p, p, i64, ctypes.c_int]
        lib.sfx_unpack_bits.restype = None
        lib.sfx_apply_signs.argtypes = [p, ctypes.c_float, p, p, i64, ctypes.c_int]
        lib.sfx_apply_signs.restype = None
        lib.sfx_straight_through_signs.argtypes = [p, p, p, ctypes.c_float, p, i64, ctypes.c_int]
        lib.sfx_straight_through_signs.restype = None
        lib.sfx_expand_signs.argtypes = [p, ctypes.c_float, p, i64, ctypes.c_int]
        lib.sfx_expand_signs.restype = None
        lib.sfx_pack_signs.argtypes = [p, i64, i64, p, p, p, ctypes.c_int]
        lib.sfx_pack_signs.restype = ctypes.c_int
        self.lib = lib

    def topk(self, segments: Tensor, groups: Tensor, threads: int) -> None:
        """One call of ``sfx_topk`` (see ``band.c``): ``segments`` (nseg, 6) and ``groups`` (ngroups, 7) int64
        tables, contiguous on the CPU; the kernel writes the bit masks and caches and ``groups[:, 3:]``."""
        status = self.lib.sfx_topk(segments.data_ptr(), segments.shape[0], groups.data_ptr(), groups.shape[0], threads)
        if status != 0:
            raise MemoryError("supermask_fx.selection.native: cannot allocate the top-k pass's scratch memory")

    def straight_through(self, grad: Tensor, scores: Tensor, weight: Tensor, out: Tensor, threads: int) -> None:
        """``out = grad * weight * sign(scores)``: contiguous float32 CPU tensors of one size (``band.c``)."""
        self.lib.sfx_straight_through(
            grad.data_ptr(), scores.data_ptr(), weight.data_ptr(), out.data_ptr(), out.numel(), threads
        )

    def apply_mask(self, weight: Tensor, mask: Tensor, out: Tensor, threads: int) -> None:
        """``out = weight * mask``: float32 ``weight`` and ``out``, bool ``mask``, one size, on the CPU, each
        dense in the same memory layout (``band.c``)."""
        self.lib.sfx_apply_mask(weight.data_ptr(), mask.data_ptr(), out.data_ptr(), out.numel(), threads)

    def apply_bits(self, weight: Tensor, words: Tensor, out: Tensor, threads: int) -> None:
        """``out = weight * mask`` for a bit mask: ``words`` int64, ``ceil(n / 64)`` of them (``band.c``)."""
        self.lib.sfx_apply_bits(weight.data_ptr(), words.data_ptr(), out.data_ptr(), out.numel(), threads)

    def apply_signs(self, signs: Tensor, scale: float, words: Tensor, out: Tensor, threads: int) -> None:
        """``out = w * mask`` for a weight held as sign bits: ``w[i] = +scale`` where bit ``i % 8`` of byte
        ``signs[i // 8]`` (uint8, ``ceil(n / 8)`` bytes) is set, else ``-scale``; ``words`` the bit mask."""
        self.lib.sfx_apply_signs(signs.data_ptr(), scale, words.data_ptr(), out.data_ptr(), out.numel(), threads)

    def straight_through_signs(
        self, grad: Tensor, scores: Tensor, signs: Tensor, scale: float, out: Tensor, threads: int
    ) -> None:
        """``straight_through`` for a weight held as sign bits (``apply_signs``'s layout)."""
        self.lib.sfx_straight_through_signs(
            grad.data_ptr(), scores.data_ptr(), signs.data_ptr(), scale, out.data_ptr(), out.numel(), threads
        )

    def expand_signs(self, signs: Tensor, scale: float, out: Tensor, threads: int) -> None:
        """``out[i] = +scale`` where bit ``i`` of ``signs`` is set, else ``-scale`` (``apply_signs``'s layout)."""
        self.lib.sfx_expand_signs(signs.data_ptr(), scale, out.data_ptr(), out.numel(), threads)

    def pack_signs(self, weight: Tensor, signs: Tensor, row_zero: Tensor, threads: int) -> float | None:
        """The sign bits of ``weight`` (contiguous float32, rows along dim 0) into ``signs`` (uint8,
        ``ceil(n / 8)``) and which rows are all zeros into ``row_zero`` (uint8, one per row); returns the magnitude
        ``c`` of the other entries, or ``None`` if some entry is neither ``+-c`` nor in a row of zeros."""
        scale = ctypes.c_float()
        rows = weight.shape[0]
        bad = self.lib.sfx_pack_signs(
            weight.data_ptr(),
            rows,
            weight.numel() // rows,
            ctypes.byref(scale),
            signs.data_ptr(),
            row_zero.data_ptr(),
            threads,
        )
        return None if bad else scale.value

    def unpack_bits(self, words: Tensor, out: Tensor, threads: int) -> None:
        """``out`` (bool, contiguous) = the bit mask ``words``."""
        self.lib.sfx_unpack_bits(words.data_ptr(), out.data_ptr(), out.numel(), threads)


#: The order key of +inf (``band.c``): NaN is 0, a finite magnitude ``x`` is ``bits(x) + 1``, +inf the largest.
INF_KEY = 0x7F800001


def order_key(value: float) -> int:
    """The order key (``band.c``) of the magnitude ``value`` rounded to float32: 0 for NaN, ``bits + 1`` for a
    number, ``INF_KEY`` for +inf; 0 too for a negative ``value`` (a band starting there holds every key)."""
    if math.isnan(value) or value < 0.0:
        return 0
    if value == 0.0:
        return 1  # -0.0 too: the magnitude 0
    return struct.unpack("<I", struct.pack("<f", to_float32(value)))[0] + 1


def to_float32(value: float) -> float:
    """``value`` rounded to float32 (to nearest, ties to even; past the largest float32, an infinity), as
    ``torch.tensor(value).float()`` gives it, without making tensors: selection calls this a few times per layer."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:  # struct refuses what rounds past float32's range; a conversion gives inf
        return math.copysign(math.inf, value)


def from_order_key(key: int) -> float:
    """The float32 magnitude whose order key is ``key`` (NaN for key 0): the inverse of ``order_key``."""
    if key <= 0:
        return math.nan
    return struct.unpack("<f", struct.pack("<I", key - 1))[0]


def kernel() -> NativeKernel | None:
    """The compiled kernel, building it on first use; ``None`` if it cannot be had (see ``unavailable_reason``)."""
    if "kernel" not in _state:
        with _lock:
            if "kernel" not in _state:
                _state["kernel"], _state["reason"], _state["pool"] = _load()
    return _state["kernel"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why ``kernel()`` is ``None`` (``None`` when it is available)."""
    kernel()
    return _state["reason"]  # type: ignore[return-value]


def thread_pool() -> str | None:
    """The threads the loaded kernel runs on: ``"openmp <path of PyTorch's libgomp>"`` or ``"pthreads"``;
    ``None`` when there is no kernel."""
    kernel()
    return _state["pool"]  # type: ignore[return-value]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _load(openmp: bool = True) -> tuple[NativeKernel | None, str | None, str | None]:
    """Build (or find) and load ``band.c``: (kernel, why not, thread pool). ``openmp=False``: the pthreads build."""
    if os.environ.get("SUPERMASK_FX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by SUPERMASK_FX_NATIVE=0", None
    if platform.system() == "Windows":
        return None, "the compiled top-k is built on POSIX systems only", None
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc/clang)", None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot run the C compiler {cc}: {exc}", None
    # PyTorch's libgomp first where there is one; the pthreads build if that cannot be built or loaded cleanly.
    gomp = _torch_libgomp() if openmp and _is_gcc(version) else None
    source = _SOURCE.read_bytes()
    failure = None
    for runtime in [gomp, None] if gomp is not None else [None]:
        digest = hashlib.sha256(
            b"\0".join([source, version.encode(), " ".join(_FLAGS).encode(), platform.machine().encode(), _id(runtime)])
        ).hexdigest()[:16]
        try:
            lib = ctypes.CDLL(str(_build(cc, digest, runtime)))
        except (OSError, subprocess.SubprocessError) as exc:  # e.g. a linker that refuses the runtime file
            failure = f"building {_SOURCE.name} failed: {exc}"
            continue
        if runtime is not None and _mapped_openmp_runtimes() != {runtime}:
            continue  # it brought a second OpenMP runtime after all: never call into that one
        return NativeKernel(lib), None, "pthreads" if runtime is None else f"openmp {runtime}"
    return None, failure, None


def _is_gcc(version: str) -> bool:
    """GCC's ``-fopenmp`` code calls the GNU OpenMP entry points (``GOMP_parallel``) that ``libgomp`` has."""
    return "Free Software Foundation" in version and "clang" not in version.lower()


def _torch_libgomp() -> Path | None:
    """The ``libgomp`` file PyTorch's parallel loops run on in this process, or ``None`` if that cannot be told
    (another OpenMP runtime, several, a backend other than OpenMP, no ``/proc/self/maps``)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    runtimes = _mapped_openmp_runtimes()
    if len(runtimes) != 1:
        return None
    (runtime,) = runtimes
    return runtime if runtime.name.startswith("libgomp") else None


def _mapped_openmp_runtimes() -> set[Path]:
    """The OpenMP runtime files (GNU, LLVM, Intel) mapped into this process, from ``/proc/self/maps``."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    found = set()
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith(("libgomp", "libomp", "libiomp")):
            found.add(Path(fields[5]))
    return found


def _id(runtime: Path | None) -> bytes:
    """What identifies the runtime a build is linked against (its path and size; empty: pthreads)."""
    if runtime is None:
        return b""
    try:
        size = runtime.stat().st_size
    except OSError:
        size = -1
    return f"{runtime}:{size}".encode()


def _build(cc: str, digest: str, runtime: Path | None = None) -> Path:
    """Compile ``band.c`` into the cache (once per digest). With ``runtime``: ``-fopenmp``, linked against that
    ``libgomp`` file (so the loader reuses the copy already loaded), else with pthreads."""
    from ...cache import default_cache_dir, is_writable_dir

    folder = default_cache_dir() / "native"
    if not is_writable_dir(folder):
        folder = Path(tempfile.gettempdir()) / f"supermask_fx-native-{os.getuid()}"
    target = folder / f"band-{digest}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    obj = tmp + ".o"
    if runtime is None:
        steps = [[cc, *_FLAGS, "-shared", str(_SOURCE), "-o", tmp]]
    else:  # compile with -fopenmp, link without it: no driver-added -lgomp, only the runtime named here
        steps = [
            [cc, *_FLAGS, "-fopenmp", "-c", str(_SOURCE), "-o", obj],
            [cc, "-shared", "-pthread", obj, str(runtime), f"-Wl,-rpath,{runtime.parent}", "-o", tmp],
        ]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise OSError(f"{cc} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: concurrent builders each put a complete file in place
    finally:
        for leftover in (tmp, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return target
