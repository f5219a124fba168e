"""The compiled CPU top-k (supermask_fx/selection/native/band.c): the same masks as the rule, and the caches it fills.

Skipped, with the reason, where no C compiler can build it (the library then uses the pure-PyTorch path).
"""

import contextlib
import math

import pytest
import torch
from torch import nn

from supermask_fx import popupify, supermask_parameters
from supermask_fx.core.masks import gated_layers
from supermask_fx.selection import cpu as cpu_backend
from supermask_fx.selection import native, set_backend
from supermask_fx.selection.bits import BitMask
from supermask_fx.selection.kernels import masked_weight, straight_through_grad
from supermask_fx.selection.topk import (
    BandHint,
    NativeGroup,
    select_topk_native,
    select_topk_native_many,
    topk_mask_reference,
)

pytestmark = pytest.mark.skipif(native.kernel() is None, reason=f"no compiled kernel: {native.unavailable_reason()}")

CHUNK = 1 << 18  # band.c's SFX_CHUNK: sizes around it exercise chunk boundaries and several threads


@pytest.fixture(autouse=True)
def _cpu_backend():
    """These tests are about the cpu back-end's compiled pass: run them on it whatever SUPERMASK_FX_SELECT says."""
    set_backend("cpu")
    yield
    set_backend(None)


@contextlib.contextmanager
def num_threads(n):
    """PyTorch's thread count set to ``n`` (the compiled passes follow it), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def threads(request):
    """The thread count a parametrized test runs with (``indirect=True``)."""
    with num_threads(request.param) as n:
        yield n


@pytest.fixture(params=["loaded", "pthreads"])
def build(request, monkeypatch):
    """Each threaded test runs on the build the library loaded (on PyTorch's OpenMP pool where it can) and on the
    pthreads build (the fallback elsewhere)."""
    if request.param == "pthreads":
        kern, reason, pool = native._load(openmp=False)
        if kern is None:
            pytest.skip(f"no pthreads build: {reason}")
        assert pool == "pthreads"
        monkeypatch.setitem(native._state, "kernel", kern)
    return request.param


def _run(scores, kept, hint=None, effective=True):
    weights = [torch.randn(s.numel(), generator=torch.Generator().manual_seed(s.numel())) for s in scores]
    bits = [BitMask.empty(s.shape) for s in scores]
    eff = [torch.full((s.numel(),), 7.0) for s in scores]
    new_hint = select_topk_native(scores, weights, kept, [b.words for b in bits], eff if effective else None, hint)
    expected = topk_mask_reference(torch.cat(scores).abs(), kept)
    masks = [_unpacked(b) for b in bits]
    assert torch.equal(torch.cat(masks), expected)
    assert torch.equal(
        torch.cat(eff),
        torch.cat(weights) * expected if effective else torch.full((sum(s.numel() for s in scores),), 7.0),
    )
    return new_hint, masks


def _unpacked(bits: BitMask) -> torch.Tensor:
    """The bool mask of ``bits``, by the compiled unpack and by PyTorch's shifts (which must agree), after
    checking that the bits past the end are zero."""
    n = bits.shape.numel()
    shifts = (bits.words.unsqueeze(1) >> torch.arange(64)) & 1
    assert not shifts.view(-1)[n:].any()
    mask = bits.to_bool()
    assert torch.equal(mask, shifts.view(-1)[:n].bool().view(bits.shape))
    return mask


def test_many_ties_any_sizes_and_global_groups():
    g = torch.Generator().manual_seed(1)
    for trial in range(150):
        sizes = [int(torch.randint(1, 300, (1,), generator=g)) for _ in range(1 + trial % 3)]
        levels = int(torch.randint(1, 7, (1,), generator=g))  # few distinct values: many ties, signs mixed
        scores = [(torch.randint(0, levels, (n,), generator=g) - levels // 2).float() for n in sizes]
        kept = int(torch.randint(1, sum(sizes) + 1, (1,), generator=g))
        _run(scores, kept, effective=trial % 2 == 0)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_across_chunks_and_threads_with_any_hint(threads, build):
    """Whatever the hint (none, tiny band, band over most of the layer: the overflow path, far off), the mask
    is the exact top-k, across chunk boundaries and with several threads."""
    g = torch.Generator().manual_seed(threads)
    s = torch.randn(2 * CHUNK + 1234, generator=g)
    s[::9] = 0.25  # a tie group straddling every chunk
    s[5::9] = -0.25
    s[::101] = 0.0
    kept = int(0.6 * s.numel())
    for hint in [None, BandHint(0.6, 1e-9), BandHint(0.5, 0.45), BandHint(0.25, 0.0), BandHint(9.0, 0.1)]:
        new_hint, masks = _run([s], kept, hint)
        assert new_hint.threshold == float(s[masks[0]].abs().min())
    parts = [s[:1000], s[1000 : CHUNK + 7], s[CHUNK + 7 :]]  # global scope: one ranking over three parts
    _run(parts, CHUNK, BandHint(0.3, 0.2))


def test_moving_threshold_and_edge_counts():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(CHUNK + 5000, generator=g)
    hint = None
    for _ in range(12):
        s += 0.02 * torch.randn(s.shape, generator=g)
        hint, _ = _run([s], 77777, hint)
    for kept in (1, s.numel() - 1, s.numel()):
        _run([s], kept)
    with pytest.raises(ValueError, match="kept"):
        _run([s], 0)


def test_many_groups_in_one_call():
    """Groups of any size, hint and tie pattern, keep-all among them, each get their own exact top-k; a group
    whose hint misses is retried alone without disturbing the others."""
    g = torch.Generator().manual_seed(5)
    groups, expected, bits = [], [], []
    for i in range(12):
        parts = [torch.randn(int(torch.randint(1, 5000, (1,), generator=g)), generator=g) for _ in range(1 + i % 2)]
        if i % 3 == 0:
            parts[0][::4] = 0.5  # ties
        total = sum(p.numel() for p in parts)
        kept = total if i == 4 else int(torch.randint(1, total + 1, (1,), generator=g))
        hint = [None, BandHint(0.7, 1e-6), BandHint(5.0, 0.01), BandHint(0.5, 0.3)][i % 4]  # exact, miss, far, wide
        weights = [torch.randn(p.numel(), generator=g) for p in parts]
        bits.append([BitMask.empty(p.shape) for p in parts])
        eff = [torch.full((p.numel(),), 7.0) for p in parts]
        groups.append(NativeGroup(parts, weights, [b.words for b in bits[-1]], eff, kept, hint))
        expected.append(topk_mask_reference(torch.cat(parts).abs(), kept))
    hints = select_topk_native_many(groups)
    for group, want, hint, group_bits in zip(groups, expected, hints, bits):
        assert torch.equal(torch.cat([_unpacked(b) for b in group_bits]), want)
        assert torch.equal(torch.cat(group.effective), torch.cat(group.weights) * want)
        if group.kept < want.numel():
            assert hint.threshold == float(torch.cat(group.scores).abs()[want].min())


def test_one_read_refreshes_every_stale_layer(monkeypatch):
    """After an optimizer step, the first layer read selects the masks of all the model's layers in one call;
    a layer with a fixed mask is left alone (its buffer is what the user froze)."""
    torch.manual_seed(0)
    model = popupify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 5)), k=0.3)
    frozen = torch.rand(30, 30) < 0.5
    model[2].register_buffer("mask", frozen.clone())  # what fix_masks does, for this layer only
    opt = torch.optim.SGD(supermask_parameters(model), lr=1.0)
    sizes = []
    real = select_topk_native_many
    monkeypatch.setattr(
        cpu_backend, "select_topk_native_many", lambda groups: sizes.append(len(groups)) or real(groups)
    )
    x = torch.randn(4, 20)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
        model[2].scores.data.neg_()  # would change this layer's top-k if it were not fixed
    assert sizes == [2, 2, 2]
    assert torch.equal(model[2].mask, frozen)
    assert torch.equal(model[2].weight, model[2]._parameters["weight"] * frozen)
    for i in (0, 4):
        kept = model[i]._supermask_gates["weight"].selector.kept
        want = topk_mask_reference(model[i].scores.detach().abs().flatten(), kept)
        assert torch.equal((model[i].weight != 0).flatten(), want)


def test_training_uses_it_and_matches_the_pure_pytorch_path():
    """Two copies of a model train side by side, one on the compiled path, one on the pure-PyTorch band:
    masks, effective weights and score gradients stay identical."""

    def make(strategy):
        torch.manual_seed(0)
        model = popupify(nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10)), k=0.4)
        for _, gate in gated_layers(model):
            gate.selector.strategy = strategy
        return model, torch.optim.SGD(supermask_parameters(model), lr=0.5, momentum=0.9)

    (a, opt_a), (b, opt_b) = make("native"), make("band")
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(6):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for (ma, ga), (mb, gb) in zip(gated_layers(a), gated_layers(b)):
            assert torch.equal(ga.current_mask(ma), gb.current_mask(mb))  # current: the cache may be ahead
            assert torch.equal(ma.weight, mb.weight)
            assert torch.equal(ma.scores.grad, mb.scores.grad)


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_straight_through_gradient_equals_pytorch(threads, build):
    """The compiled score gradient g * w * sign(s) against PyTorch's ops: zeros of both signs, NaN (sign 0, as
    in torch.sign), infinities, sizes across chunk boundaries."""
    g = torch.Generator().manual_seed(threads)
    n = 2 * CHUNK + 77
    s, w, grad = (torch.randn(n, generator=g) for _ in range(3))
    s[::7], s[1::11], s[2::13] = 0.0, -0.0, float("nan")
    w[::17], grad[::19], grad[3::23] = 0.0, float("inf"), -0.0
    out = straight_through_grad(grad, s, w)
    expected = torch.sign(s) * w * grad
    assert torch.equal(out.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(out[keep], expected[keep])  # -0.0 == 0.0: only the sign of zero results may differ
    small = torch.randn(5, 4, 3, 3, generator=g)
    assert torch.equal(straight_through_grad(small, small.neg(), small.exp()), torch.sign(-small) * small.exp() * small)


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_masked_weight_equals_pytorch(threads, build):
    g = torch.Generator().manual_seed(threads)
    w = torch.randn(2 * CHUNK + 77, generator=g)
    w[::5] = float("nan")
    mask = torch.rand(w.shape, generator=g) < 0.3
    out = masked_weight(w, mask)
    assert torch.equal(out.isnan(), w.isnan() & mask)  # a dropped NaN is gone: w where kept, else 0
    assert torch.equal(out.nan_to_num(), torch.where(mask, w, 0.0).nan_to_num())
    conv = torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)  # the PyTorch path
    mask = torch.rand(conv.shape, generator=g) < 0.5
    out = masked_weight(conv, mask)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, conv * mask)


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_bit_mask_apply_and_unpack_equal_pytorch(threads, build):
    """``BitMask.apply`` (``w * mask`` a word at a time) and ``to_bool`` against PyTorch, bit for bit, over several
    chunks and a partial last word; a dropped NaN weight is +0."""
    g = torch.Generator().manual_seed(threads)
    n = 2 * CHUNK + 77
    w = torch.randn(n, generator=g)
    w[::5] = float("nan")
    bits = BitMask.empty(torch.Size([n]))
    bits.words.random_(-(2**63), 2**63 - 1, generator=g)  # every bit, the sign bit too
    bits.words[-1] &= (1 << (n % 64)) - 1  # the bits past the end are zero
    mask = _unpacked(bits)
    want = torch.where(mask, w, torch.zeros(()))
    assert torch.equal(bits.apply(w).view(torch.int32), want.view(torch.int32))


def test_a_step_between_forward_and_backward_is_caught():
    model = popupify(nn.Linear(8, 4), k=0.5)
    opt = torch.optim.SGD(supermask_parameters(model), lr=0.1)
    loss = model(torch.randn(2, 8)).sum()
    model(torch.randn(2, 8)).sum().backward()
    opt.step()  # the first forward's scores are gone: its gradient would be for other scores
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_native_strategy_refuses_what_it_cannot_do():
    model = popupify(nn.Linear(8, 4), k=0.5)
    model.double()
    gate = next(iter(gated_layers(model)))[1]
    gate.selector.strategy = "native"
    with pytest.raises(RuntimeError, match="strategy='native' cannot be used"):
        model(torch.randn(2, 8, dtype=torch.float64))
    gate.selector.strategy = "auto"  # falls back to the pure-PyTorch path
    assert model(torch.randn(2, 8, dtype=torch.float64)).shape == (2, 4)


def test_runs_on_pytorchs_openmp_pool():
    """Where PyTorch runs on GNU OpenMP and the compiler is GCC, the kernel shares PyTorch's thread pool: it is
    linked against the libgomp file already loaded, and the process still maps exactly one OpenMP runtime."""
    runtime = native._torch_libgomp()
    if runtime is None or not native._is_gcc(_compiler_version()):
        pytest.skip("PyTorch's OpenMP runtime is not a libgomp this test can find, or the compiler is not GCC")
    assert native.thread_pool() == f"openmp {runtime}"
    with num_threads(3):
        s = torch.randn(3 * CHUNK)
        _run([s], CHUNK)  # a threaded call, checked against the rule
    assert native._mapped_openmp_runtimes() == {runtime}


def _compiler_version() -> str:
    import subprocess

    return subprocess.run([native._compiler(), "--version"], capture_output=True, text=True).stdout


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SUPERMASK_FX_NATIVE", "0")
    assert native.kernel() is None
    assert "SUPERMASK_FX_NATIVE" in native.unavailable_reason()


def test_bit_masks_in_training_and_their_bool_view():
    """Training on the compiled path keeps each mask as bits (1/8 of a bool tensor) and no bool copy, inside the
    selection's ``LayerMask``; its ``tensor()`` unpacks them on demand, equal to the rule; a pickled model, and a
    gate whose caches were cleared, give the same outputs."""
    import pickle

    torch.manual_seed(0)
    model = popupify(nn.Sequential(nn.Linear(70, 130), nn.ReLU(), nn.Linear(130, 5)), k=0.3)
    opt = torch.optim.SGD(supermask_parameters(model), lr=1.0)
    x = torch.randn(4, 70)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    model(x)  # selects the masks of the stepped scores
    gates = [gate for _, gate in gated_layers(model)]
    assert all(g.layer_mask.bits is not None and g.layer_mask.bool_mask is None for g in gates)
    assert [g.layer_mask.bits.words.numel() for g in gates] == [-(-70 * 130 // 64), -(-130 * 5 // 64)]
    for module, gate in gated_layers(model):
        want = topk_mask_reference(module.scores.detach().abs(), gate.selector.kept)
        assert torch.equal(gate.layer_mask.tensor(), want)
        assert torch.equal(module.weight, module._parameters["weight"] * want)
    model.eval()
    with torch.no_grad():
        out = model(x)
        again = pickle.loads(pickle.dumps(model))
        assert torch.equal(again(x), out)
        gates[0].clear_cache()  # the selection's storage dropped: selected again at the next read
        assert gates[0].layer_mask.bits is None and torch.equal(model(x), out)
    with pytest.raises(ValueError, match="cannot mask a weight"):
        BitMask.empty(torch.Size([4, 3])).apply(torch.randn(3, 4))


# ---------------------------------------------------------------------------------------------- non-finite scores


def _non_finite_cases(n, g):
    """(scores, kept) pairs: NaN and inf sprinkled in, more NaNs than dropped entries, all NaN, all infinite, more
    infinities than kept entries."""
    s = torch.randn(n, generator=g)
    sparse = s.clone()
    sparse[::7], sparse[3::11], sparse[5::13] = math.nan, math.inf, -math.inf
    sparse[::101] = 0.0
    half_nan = s.clone()
    half_nan[::2] = math.nan
    many_inf = torch.where(torch.rand(n, generator=g) < 0.4, -math.inf, s)
    return [
        (sparse, int(0.3 * n)),
        (sparse, n - n // 7 + 5),  # every number and a few NaNs
        (half_nan, int(0.7 * n)),  # more NaNs than dropped entries
        (torch.full((n,), math.nan), int(0.3 * n)),
        (torch.full((n,), -math.inf), int(0.6 * n)),
        (many_inf, int(0.2 * n)),  # more infinities than kept entries
    ]


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_non_finite_scores_across_chunks_threads_and_hints(threads, build):
    """NaN ranks below every number, +-inf above every finite magnitude (supermask_fx/selection/topk.py's rule): the
    compiled band keeps exactly the reference's entries whatever the hint, across chunks and threads."""
    g = torch.Generator().manual_seed(threads)
    n = 2 * CHUNK + 1234
    for s, kept in _non_finite_cases(n, g):
        for hint in [None, BandHint(0.6, 1e-9), BandHint(0.5, 0.45), BandHint(9.0, 0.1)]:
            _run([s], kept, hint)
        _run([s[:1000], s[1000 : CHUNK + 7], s[CHUNK + 7 :]], kept, BandHint(0.3, 0.2))  # global scope


def test_non_finite_groups_in_one_call_and_their_hints():
    """Groups of NaN/inf mixes side by side with ordinary ones, in one call; a non-finite threshold leaves no
    hint (the next call starts from the exact threshold) and the call after that is exact too."""
    g = torch.Generator().manual_seed(11)
    cases = _non_finite_cases(5000, g) + [(torch.randn(3000, generator=g), 1000)]
    bits = [BitMask.empty(s.shape) for s, _ in cases]
    groups = [
        NativeGroup([s], [torch.randn(s.numel(), generator=g)], [b.words], None, kept, BandHint(0.5, 0.01))
        for (s, kept), b in zip(cases, bits)
    ]
    for _ in range(2):
        hints = select_topk_native_many(groups)
        for group, b, hint in zip(groups, bits, hints):
            want = topk_mask_reference(group.scores[0].abs(), group.kept)
            assert torch.equal(_unpacked(b), want)
            kept = group.scores[0].abs()[want]
            threshold = math.nan if kept.isnan().any() else float(kept.min())  # T: NaN if a NaN had to be kept
            assert (hint is None) == (not math.isfinite(threshold))
            if hint is not None:
                assert hint.threshold == threshold
            group.hint = hint


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_nan_and_inf_scores_train_on_the_compiled_path(scope):
    """A model whose scores went NaN (a whole layer; more NaNs than a layer drops) and infinite trains on
    without an error, its masks the reference's on the compiled path and equal to the pure-PyTorch band's."""

    def make(strategy):
        torch.manual_seed(0)
        model = popupify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), k=0.3, scope=scope)
        with torch.no_grad():
            model[0].scores.fill_(math.nan)
            model[2].scores[:, :20] = math.nan
            model[2].scores[0, 25:] = -math.inf
        for _, gate in gated_layers(model):
            gate.selector.strategy = strategy
        return model, torch.optim.SGD(supermask_parameters(model), lr=0.1)

    x = torch.randn(4, 20)
    (a, opt_a), (b, opt_b) = make("native"), make("band")
    for _ in range(2):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).nan_to_num().square().sum().backward()
            opt.step()
        pairs = list(gated_layers(a))
        masks = [gate.current_mask(module).flatten() for module, gate in pairs]
        magnitudes = [module.scores.detach().abs().flatten() for module, _ in pairs]
        if scope == "global":
            assert torch.equal(torch.cat(masks), topk_mask_reference(torch.cat(magnitudes), pairs[0][1].selector.kept))
        else:
            for (_, gate), mask, a_ in zip(pairs, masks, magnitudes):
                assert torch.equal(mask, topk_mask_reference(a_, gate.selector.kept))
        for (ma, ga), (mb, gb) in zip(gated_layers(a), gated_layers(b)):
            assert torch.equal(ga.current_mask(ma), gb.current_mask(mb))


def test_float32_rounding_and_order_keys_equal_torchs_conversion():
    """``to_float32`` and ``order_key`` (struct, no tensors) round as a float32 tensor conversion does: random
    doubles over the whole exponent range, the points halfway between float32 neighbours (ties to even), the
    edge of float32's range (past it: inf), subnormals, signed zeros, infinities and NaN."""
    g = torch.Generator().manual_seed(0)
    mantissa = torch.rand(4000, generator=g, dtype=torch.float64) + 0.5
    exponent = torch.randint(-160, 140, (4000,), generator=g).to(torch.float64)
    values = (mantissa * torch.pow(2.0, exponent)).tolist()
    neighbours = torch.tensor([1.0, 3.0, 1e-40, 2.0**-126, 1e30], dtype=torch.float32)
    upper = torch.nextafter(neighbours, torch.tensor(math.inf))
    values += ((neighbours.double() + upper.double()) / 2).tolist()  # exact halfway points
    big = float(torch.finfo(torch.float32).max)
    values += [big, big * (1 + 2.0**-25), big * (1 + 2.0**-24), big * (1 + 2.0**-23), 1e39, 1e300, 5e-324, 1e-46]
    values += [0.0, -0.0, math.inf, -math.inf, math.nan]
    values += [-v for v in values[:50]]
    for value in values:
        expected = torch.tensor(value, dtype=torch.float64).float()
        got = native.to_float32(value)
        assert (math.isnan(got) and expected.isnan()) or got == expected.item(), value
        if math.isnan(value) or value < 0:
            assert native.order_key(value) == 0
        else:
            # band.c's key of a magnitude: its float32 bits without the sign, plus 1 (so -0.0 is 0.0's key)
            assert native.order_key(value) == (int(expected.view(torch.int32)) & 0x7FFFFFFF) + 1, value
