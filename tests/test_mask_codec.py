"""The mask codec of subnetwork files (format version 2): lossless, near the entropy, and strict when decoding."""

import math
import re

import pytest
import torch

from supermask_fx.files.mask_codec import SubnetworkFileError, decode_mask, encode_mask, pack_bits, unpack_bits

DENSITIES = [0.0, "one", 0.01, 0.3, 0.5, 0.7, 0.99, "all but one", 1.0]
LENGTHS = [1, 7, 9, 1000003]


def random_mask(n, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    if p == "one":
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randint(n, (1,), generator=g)] = True
        return mask
    if p == "all but one":
        return ~random_mask(n, "one", seed)
    return torch.rand(n, generator=g) < p


def entry(mask, fields, name="layer3.0.conv2.weight"):
    return {"name": name, "shape": list(mask.shape), "kept": int(mask.sum()), **fields}


def round_trip(mask):
    data, fields = encode_mask(mask)
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert fields["encoding"] in ("bits", "rice")
    decoded = decode_mask(data, entry(mask, fields))
    assert decoded.dtype == torch.bool and decoded.shape == mask.shape
    assert torch.equal(decoded, mask)
    assert data.numel() <= -(-mask.numel() // 8)  # never more than the bitmap
    if fields["encoding"] == "bits":
        assert torch.equal(data, pack_bits(mask))
    else:
        m, b = fields["m"], fields["rice_b"]
        assert fields["minority"] == (int(mask.sum()) * 2 <= mask.numel())
        assert m == int((mask == fields["minority"]).sum())
        assert data.numel() == fields["unary_bytes"] + -(-m * b // 8)
    return data, fields


def entropy_bytes(mask):
    p = mask.float().mean().item()
    h = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return mask.numel() * h / 8


def reference_encode(mask, b):
    """The format written out bit by bit in plain Python, straight from the description in mask_codec."""
    flat = mask.reshape(-1).tolist()
    minority = sum(flat) * 2 <= len(flat)
    positions = [i for i, v in enumerate(flat) if v == minority]
    unary, remainder, previous = [], [], -1
    for p in positions:
        gap = p - previous - 1
        previous = p
        unary += [0] * (gap >> b) + [1]
        remainder += [(gap >> (b - 1 - j)) & 1 for j in range(b)]

    def packed(bits):
        bits = bits + [0] * (-len(bits) % 8)
        return [int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8)]

    return packed(unary) + packed(remainder), minority, len(positions), len(packed(unary))


def test_pack_bits_is_msb_first():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b10000001, 0b11000000]
    assert torch.equal(unpack_bits(pack_bits(mask), (10,)), mask)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("p", DENSITIES)
def test_round_trip_random(n, p):
    data, fields = round_trip(random_mask(n, p, seed=n))
    if p in (0.0, 1.0, "one", "all but one") and n >= 9:
        assert fields["encoding"] == "rice" and data.numel() < 8  # at most a few bytes for at most one minority
    if p in (0.0, 1.0) and n > 1:
        assert fields["m"] == 0 and data.numel() == 0


def test_round_trip_keeps_the_shape_and_row_major_order():
    mask = random_mask(4 * 3 * 5 * 7, 0.1, seed=2).reshape(4, 3, 5, 7)
    round_trip(mask)
    round_trip(mask.transpose(0, 1))  # non-contiguous input


def test_round_trip_structured_masks():
    n = 100_003
    alternating = torch.arange(n) % 2 == 0
    runs = (torch.arange(n) // 1000) % 3 == 0  # runs of 1000 kept, 2000 dropped
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 5000, (200,), generator=g)
    random_runs = torch.repeat_interleave(torch.arange(200) % 2 == 0, lengths)
    first_and_last = torch.zeros(n, dtype=torch.bool)
    first_and_last[[0, n - 1]] = True
    tail = torch.zeros(n, dtype=torch.bool)
    tail[-5000:] = True
    head = ~tail
    for mask in [alternating, ~alternating, runs, ~runs, random_runs, first_and_last, tail, head]:
        data, fields = round_trip(mask)
        if mask is first_and_last:
            assert fields["encoding"] == "rice" and data.numel() < 10


def test_a_tie_codes_the_true_entries():
    front = torch.arange(64) < 32  # as many True as False: the True entries are the "minority"
    data, fields = round_trip(front)
    assert fields["encoding"] == "rice" and fields["minority"] is True and fields["m"] == 32


def test_size_near_the_entropy_at_p_0_3():
    mask = random_mask(1_000_000, 0.3, seed=5)
    data, fields = round_trip(mask)
    assert fields["encoding"] == "rice" and fields["minority"] is True
    assert data.numel() <= 1.02 * entropy_bytes(mask)
    flipped, fields = round_trip(~mask)  # p = 0.7: the False entries are coded, as compactly
    assert fields["minority"] is False and flipped.numel() == data.numel()


def test_sparse_masks_cost_about_the_entropy():
    for p in [0.01, 0.1]:
        mask = random_mask(1_000_000, p, seed=6)
        data, _ = round_trip(mask)
        assert data.numel() <= 1.02 * entropy_bytes(mask)


@pytest.mark.parametrize("seed", range(4))
def test_p_0_5_stays_a_bitmap(seed):
    n = 1_000_000
    mask = random_mask(n, 0.5, seed=seed)
    mask[-8:] = torch.tensor([0, 1] * 4, dtype=torch.bool)  # the last byte holds both values
    data, fields = round_trip(mask)
    assert fields == {"encoding": "bits"} and data.numel() == n // 8
    exact = torch.zeros(n, dtype=torch.bool)
    exact[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 2]] = True  # k = 0.5 exactly
    exact[-2:] = torch.tensor([True, False])
    assert round_trip(exact)[1] == {"encoding": "bits"}


@pytest.mark.parametrize("p", [0.002, 0.05, 0.3, 0.35])
def test_matches_a_bit_by_bit_reference_and_picks_the_best_parameter(p):
    mask = random_mask(20_000, p, seed=7)
    data, fields = round_trip(mask)
    assert fields["encoding"] == "rice"
    expected, minority, m, unary_bytes = reference_encode(mask, fields["rice_b"])
    assert data.tolist() == expected
    assert (fields["minority"], fields["m"], fields["unary_bytes"]) == (minority, m, unary_bytes)
    best = min(len(reference_encode(mask, b)[0]) for b in range(0, 16))
    assert data.numel() == best


def test_numpy_recipe_of_the_docs_decodes():
    """The by-hand decoder shown in docs/file-formats.md."""
    np = pytest.importorskip("numpy")

    def decode(data, layer):
        n = int(np.prod(layer["shape"]))
        if layer.get("encoding", "bits") == "bits":
            return np.unpackbits(data)[:n].astype(bool).reshape(layer["shape"])
        m, b, u = layer["m"], layer["rice_b"], layer["unary_bytes"]
        ones = np.flatnonzero(np.unpackbits(data[:u]))  # where each gap's unary code ends
        r = np.unpackbits(data[u:])[: m * b].reshape(m, b) @ (1 << np.arange(b - 1, -1, -1))
        gaps = ((np.diff(ones, prepend=-1) - 1) << b) | r
        mask = np.full(n, not layer["minority"])
        mask[np.cumsum(gaps + 1) - 1] = layer["minority"]
        return mask.reshape(layer["shape"])

    for p in [0.0, 0.01, 0.3, 0.5, 0.9]:
        mask = random_mask(30_011, p, seed=8).reshape(30_011, 1)
        data, fields = encode_mask(mask)
        assert np.array_equal(decode(data.numpy(), entry(mask, fields)), mask.numpy())


@pytest.fixture
def coded():
    """A rice-coded mask with b > 0 and padding bits after its remainder stream, and its metadata entry."""
    for seed in range(100):
        mask = random_mask(10_000, 0.05, seed=seed)
        data, fields = encode_mask(mask)
        assert fields["encoding"] == "rice" and fields["rice_b"] > 0
        if fields["m"] * fields["rice_b"] % 8:
            return mask, data, entry(mask, fields)
    raise AssertionError("no remainder stream with padding")


def assert_corrupted(data, layer, match):
    """The decoder refuses ``data``, naming the file and the layer, with a detail matching ``match``."""
    with pytest.raises(
        SubnetworkFileError, match=r"^f\.safetensors: corrupted mask for layer3\.0\.conv2\.weight: "
    ) as e:
        decode_mask(data, layer, where="f.safetensors: ")
    assert re.search(match, str(e.value)), str(e.value)


def test_decoder_rejects_a_wrong_count(coded):
    _, data, layer = coded
    b = layer["rice_b"]
    for m in [layer["m"] - 1, layer["m"] + 1]:
        assert_corrupted(data, {**layer, "m": m}, match="bytes|ones")  # lengths or the count of ones differ
        # lengths made to match: the unary stream holds the wrong number of ones
        remainder = data[layer["unary_bytes"] :][: -(-m * b // 8)]
        remainder = torch.cat([remainder, remainder.new_zeros(-(-m * b // 8) - remainder.numel())])
        assert_corrupted(torch.cat([data[: layer["unary_bytes"]], remainder]), {**layer, "m": m}, match="ones")
    assert_corrupted(data, {**layer, "kept": layer["kept"] + 1}, match="keeps")
    assert_corrupted(data, {**layer, "m": 20_000}, match="positions in a mask of")


def test_decoder_rejects_wrong_byte_lengths(coded):
    mask, data, layer = coded
    assert_corrupted(data[:-1], layer, match="bytes")
    assert_corrupted(torch.cat([data, data.new_zeros(1)]), layer, match="bytes")
    assert_corrupted(data, {**layer, "unary_bytes": layer["unary_bytes"] - 1}, match="bytes")
    padded = torch.cat([data[: layer["unary_bytes"]], data.new_zeros(1), data[layer["unary_bytes"] :]])
    assert_corrupted(padded, {**layer, "unary_bytes": layer["unary_bytes"] + 1}, match="last one bit")
    bits_layer = {**layer, "encoding": "bits"}
    for key in ("minority", "m", "rice_b", "unary_bytes"):
        bits_layer.pop(key)
    assert_corrupted(pack_bits(mask)[:-1], bits_layer, match="bytes for 10000 entries")
    assert_corrupted(pack_bits(mask).to(torch.int16), bits_layer, match="uint8")


def test_decoder_rejects_positions_beyond_the_mask():
    mask = torch.zeros(100, dtype=torch.bool)
    mask[99] = True  # one gap of 99
    data, fields = encode_mask(mask)
    assert fields["encoding"] == "rice" and fields["m"] == 1
    b = fields["rice_b"]
    shorter = {**entry(mask, fields), "shape": [99]}
    assert_corrupted(data, shorter, match="beyond the mask's 99 entries")
    far = {**entry(mask, fields), "shape": [(99 >> b) << b]}  # the quotient alone reaches past the end
    assert_corrupted(data, far, match="beyond the mask")
    assert_corrupted(data, {**entry(mask, fields), "rice_b": 40}, match="Rice parameter")
    assert_corrupted(data, {**entry(mask, fields), "minority": 1}, match="minority")
    assert_corrupted(data, {**entry(mask, fields), "m": -1}, match="not a count")


def test_decoder_rejects_nonzero_padding(coded):
    _, data, layer = coded
    bad = data.clone()
    bad[-1] |= 1
    assert_corrupted(bad, layer, match="padding")


def test_unknown_encoding_says_to_upgrade(coded):
    _, data, layer = coded
    with pytest.raises(SubnetworkFileError, match=r"layer3\.0\.conv2\.weight.*'zstd'.*upgrade"):
        decode_mask(data, {**layer, "encoding": "zstd"})
