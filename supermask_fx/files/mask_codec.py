"""Mask encodings of the subnetwork file (format version 2): a bitmap, or a Golomb-Rice code of gaps.

Each gated layer's bool mask is flattened row-major (``n`` entries) and stored in one uint8 tensor
``mask/<layer>.<param>``; its entry in the file's ``layers`` metadata names the encoding:

``"encoding": "bits"`` (also every layer of a version-1 file, which has no ``encoding`` key)
    ``pack_bits(mask)``: ``ceil(n / 8)`` bytes, 8 entries a byte, the first entry in the most significant bit,
    the last byte zero-padded. 1 bit per weight.

``"encoding": "rice"``, with the extra keys ``minority``, ``m``, ``rice_b``, ``unary_bytes``
    ``minority`` (JSON bool) is the value that is less frequent in the mask (``True`` when the counts tie) and
    ``m`` how often it occurs. Its positions ``p_0 < ... < p_{m-1}`` are coded as gaps
    ``g_i = p_i - p_{i-1} - 1`` (``p_{-1} = -1``), each split with the Rice parameter ``b = rice_b`` into
    ``q_i = g_i >> b`` and ``r_i = g_i & (2**b - 1)``. The tensor holds two bit streams, each packed like
    ``pack_bits`` (first bit in the most significant bit, last byte zero-padded), one after the other:

    * the unary stream, ``unary_bytes`` bytes: for each gap in turn, ``q_i`` zero bits then a one bit;
    * the remainder stream, ``ceil(m * b / 8)`` bytes: ``r_0, ..., r_{m-1}``, ``b`` bits each, most
      significant bit first.

    Every other entry has the majority value ``not minority``. An all-True or all-False mask is ``m = 0``: an
    empty tensor.

The writer (``encode_mask``) takes, per layer, the Rice parameter with the fewest bytes (see
``_RiceSizes.best``), then the smaller of the two encodings (a tie keeps the bitmap). A mask keeping a fraction
``p`` of its entries costs about ``H(p)`` bits per entry this way (0.888 bits at ``p = 0.3``, where
``H(0.3) = 0.881``; 0.08 at ``p = 0.01``) and never more than 1 bit (``p = 0.5`` stays a bitmap).

Both directions are vectorized torch operations, no Python loop over entries, and need nothing but torch.
``decode_mask`` checks the stream against the metadata (byte lengths, the count of ones in the unary stream,
positions inside ``[0, n)``, the layer's kept count) and raises ``SubnetworkFileError`` naming the layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SubnetworkFileError", "pack_bits", "unpack_bits", "encode_mask", "decode_mask", "ENCODINGS"]

ENCODINGS = ("bits", "rice")


class SubnetworkFileError(ValueError):
    """A subnetwork file that cannot be loaded into this model; the message says what differs."""


_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Bool (or 0/1) tensor -> uint8 of ceil(numel / 8) bytes, first entry in the most significant bit."""
    flat = mask.reshape(-1).to(device="cpu", dtype=torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) * _WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of ``pack_bits``: the first ``prod(shape)`` bits as a bool tensor of ``shape``."""
    numel = 1
    for d in shape:
        numel *= d
    bits = (packed.reshape(-1, 1) >> _SHIFTS) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(shape)


def _nbytes(bits: int) -> int:
    return -(-bits // 8)


def _total(x: Tensor) -> int:
    """``int(x.sum())`` for a 1-D integer tensor whose sum fits its dtype; a cumulative sum is several times faster
    than torch's integer ``sum`` on CPU."""
    return int(torch.cumsum(x, 0, dtype=x.dtype)[-1]) if x.numel() else 0


def _index_dtype(n: int) -> torch.dtype:
    """int32 (half the memory traffic of int64) where every position, gap and stream offset of ``n`` entries fits."""
    return torch.int32 if n < 2**31 else torch.int64


class _RiceSizes:
    """Exact sizes of the Rice code of ``gaps`` (total ``sum_gaps``) for each parameter ``b``, each computed once."""

    def __init__(self, gaps: Tensor, sum_gaps: int):
        self.gaps, self.m = gaps, gaps.numel()
        self._q = {0: sum_gaps}

    def bits(self, b: int) -> int:
        """Both streams in bits: ``sum(g >> b)`` zeros and ``m`` ones, then ``m * b`` remainder bits."""
        if b not in self._q:
            self._q[b] = _total(self.gaps >> b)
        return self._q[b] + self.m * (b + 1)

    def bytes(self, b: int) -> int:
        """Both streams in whole bytes."""
        self.bits(b)
        return _nbytes(self._q[b] + self.m) + _nbytes(self.m * b)

    def best(self) -> int:
        """The Rice parameter: the fewest bits, then the fewest whole bytes among its neighbours (smallest ``b``).

        In bits, the size ``sum(g >> b) + m * (b + 1)`` is convex in ``b`` (its increments
        ``m - sum(ceil((g >> b) / 2))`` never decrease), so a descent from ``log2(mean gap)`` finds its minimum
        ``b*`` with a few passes over the gaps; the rounding of the two streams to whole bytes (under 2 bytes) is
        settled by comparing ``b* - 1 .. b* + 1`` in bytes. Parameters above the bit length of the largest gap only
        add remainder bits.
        """
        m = self.m
        if m == 0:
            return 0
        top = int(self.gaps.max()).bit_length()
        mean = -(-self._q[0] // m)
        b = min(max(mean.bit_length() - 1, 0), top)
        while b + 1 <= top and self.bits(b + 1) < self.bits(b):
            b += 1
        while b - 1 >= 0 and self.bits(b - 1) <= self.bits(b):
            b -= 1
        return min(range(max(b - 1, 0), min(b + 1, top) + 1), key=lambda c: (self.bytes(c), c))


def encode_mask(mask: Tensor) -> tuple[Tensor, dict]:
    """Encode ``mask`` (any shape, bool) as the smaller of the two encodings.

    Returns the uint8 tensor to store as ``mask/<layer>`` and the fields to add to the layer's metadata entry:
    ``{"encoding": "bits"}`` or ``{"encoding": "rice", "minority", "m", "rice_b", "unary_bytes"}``.
    """
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.bool)
    n = flat.numel()
    kept = int(torch.count_nonzero(flat))
    minority = kept <= n - kept
    m = kept if minority else n - kept
    bitmap_bytes = _nbytes(n)
    if 2 * _nbytes(m) >= bitmap_bytes and bool((flat[8 * bitmap_bytes - 8 :] == minority).any()):
        # a shortcut, not a heuristic (k = 0.5 lands here): any b >= 1 needs at least m unary and m remainder bits,
        # and b = 0 runs to the last minority entry, here in the bitmap's last byte: Rice cannot be smaller
        return pack_bits(flat), {"encoding": "bits"}
    index = _index_dtype(n)
    positions = torch.nonzero(flat if minority else ~flat, as_tuple=True)[0].to(index)
    gaps = torch.empty_like(positions)
    if m:
        gaps[0] = positions[0]
        torch.sub(positions[1:], positions[:-1], out=gaps[1:])
        gaps[1:] -= 1
    sizes = _RiceSizes(gaps, int(positions[-1]) + 1 - m if m else 0)
    b = sizes.best()
    if sizes.bytes(b) >= bitmap_bytes:
        return pack_bits(flat), {"encoding": "bits"}
    # the one ending gap i lands at i + q_0 + ... + q_i; with b = 0 that is p_i itself
    ones = positions if b == 0 else torch.cumsum((gaps >> b) + 1, 0, dtype=index) - 1
    unary = torch.zeros(int(ones[-1]) + 1 if m else 0, dtype=torch.uint8)
    unary[ones] = 1
    unary = pack_bits(unary)
    if b:
        small = torch.uint8 if b <= 8 else index
        r = (gaps & ((1 << b) - 1)).to(small)
        remainder = pack_bits((r.unsqueeze(1) >> torch.arange(b - 1, -1, -1, dtype=small)) & 1)
    else:
        remainder = torch.zeros(0, dtype=torch.uint8)
    fields = {"encoding": "rice", "minority": minority, "m": m, "rice_b": b, "unary_bytes": unary.numel()}
    return torch.cat([unary, remainder]), fields


def decode_mask(data: Tensor, layer: dict, where: str = "") -> Tensor:
    """Decode the stored tensor ``data`` of the metadata entry ``layer`` (``name``, ``shape``, ``kept``, and the
    encoding's fields) into a bool mask of ``layer["shape"]``.

    Raises:
        SubnetworkFileError: an unknown encoding (written by a newer supermask_fx), or data that does not match
            its metadata ("corrupted"); the message starts with ``where`` and names the layer.
    """
    name = layer.get("name", "?")

    def corrupted(detail: str) -> SubnetworkFileError:
        return SubnetworkFileError(f"{where}corrupted mask for {name}: {detail}")

    encoding = layer.get("encoding", "bits")
    if encoding not in ENCODINGS:
        raise SubnetworkFileError(
            f"{where}{name} uses the mask encoding {encoding!r}, which this supermask_fx does not know "
            f"(it reads {', '.join(ENCODINGS)}): the file was written by a newer version; upgrade supermask_fx"
        )
    shape = tuple(int(d) for d in layer["shape"])
    n = 1
    for d in shape:
        n *= d
    if data.dtype != torch.uint8:
        raise corrupted(f"stored as {data.dtype}, not uint8")
    data = data.reshape(-1)
    if encoding == "bits":
        if data.numel() != _nbytes(n):
            raise corrupted(f"{data.numel()} bytes for {n} entries as bits (expected {_nbytes(n)})")
        mask = unpack_bits(data, shape)
        count = int(torch.count_nonzero(mask))
    else:
        mask, count = _decode_rice(data, layer, n, corrupted)
        mask = mask.reshape(shape)
    if count != layer.get("kept"):
        raise corrupted(f"it keeps {count} weights, the metadata says {layer.get('kept')!r}")
    return mask


def _decode_rice(data: Tensor, layer: dict, n: int, corrupted) -> tuple[Tensor, int]:
    """The flat mask and its count of True entries."""
    minority, m, b, unary_bytes = (layer.get(key) for key in ("minority", "m", "rice_b", "unary_bytes"))
    if not isinstance(minority, bool):
        raise corrupted(f"'minority' is {minority!r}, not true/false")
    for key, value in (("m", m), ("rice_b", b), ("unary_bytes", unary_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise corrupted(f"{key!r} is {value!r}, not a count")
    if m > n:
        raise corrupted(f"m = {m} positions in a mask of {n} entries")
    if b > max(n - 1, 1).bit_length():  # the writer's b never exceeds the bit length of the largest gap
        raise corrupted(f"Rice parameter {b} for a mask of {n} entries")
    remainder_bytes = _nbytes(m * b)
    if data.numel() != unary_bytes + remainder_bytes:
        raise corrupted(
            f"{data.numel()} bytes, the metadata says {unary_bytes} unary + {remainder_bytes} remainder bytes"
        )
    unary = unpack_bits(data[:unary_bytes], (unary_bytes * 8,))
    ones = torch.nonzero(unary, as_tuple=True)[0]
    if ones.numel() != m:
        raise corrupted(f"the unary stream holds {ones.numel()} ones, the metadata says m = {m}")
    if _nbytes(int(ones[-1]) + 1 if m else 0) != unary_bytes:
        raise corrupted(f"the unary stream has {unary_bytes} bytes but its last one bit is in an earlier byte")
    if m and int(ones[-1]) - (m - 1) > (n - 1) >> b:  # q_0 + ... + q_{m-1}: the gaps alone pass the end
        raise corrupted(f"the gaps reach beyond the mask's {n} entries")
    # p_i = ((q_0 + ... + q_i) << b) + (r_0 + 1) + ... + (r_i + 1) - 1, and q_0 + ... + q_i = ones_i - i
    index = torch.int32 if (m << b) + n < 2**31 else torch.int64  # bounds every partial sum: no overflow
    if b:
        bits = unpack_bits(data[unary_bytes:], (remainder_bytes * 8,))
        if bits[m * b :].any():
            raise corrupted("nonzero padding after the remainder stream")
        small = torch.uint8 if b <= 8 else index
        r = (bits[: m * b].view(m, b).to(small) << torch.arange(b - 1, -1, -1, dtype=small)).sum(1, dtype=index)
        positions = ((ones.to(index) - torch.arange(m, dtype=index)) << b) + torch.cumsum(r + 1, 0, dtype=index) - 1
    else:
        positions = ones
    if m and int(positions[-1]) >= n:
        raise corrupted(f"position {int(positions[-1])} is beyond the mask's {n} entries")
    flat = torch.full((n,), not minority, dtype=torch.bool)
    flat[positions] = minority
    return flat, m if minority else n - m
