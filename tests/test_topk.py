"""Exact top-k: the library's masks and gradients against the paper's Algorithm 1 and the documented tie rule."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.algorithm1 import GetSubnet
from supermask_fx import kept_count, popupify
from supermask_fx.selection.topk import BandHint, select_topk, topk_mask_reference


@pytest.mark.parametrize("strategy", ["band", "select"])
def test_select_topk_matches_stable_sort_with_ties(strategy):
    g = torch.Generator().manual_seed(1)
    for trial in range(200):
        sizes = [int(torch.randint(1, 200, (1,), generator=g)) for _ in range(1 + trial % 3)]
        levels = int(torch.randint(1, 7, (1,), generator=g))  # few distinct values: many ties
        parts = [torch.randint(0, levels, (n,), generator=g).float() for n in sizes]
        kept = int(torch.randint(1, sum(sizes) + 1, (1,), generator=g))
        masks = [torch.empty(n, dtype=torch.bool) for n in sizes]
        select_topk(parts, kept, masks, None, strategy)
        assert torch.equal(torch.cat(masks), topk_mask_reference(torch.cat(parts), kept)), trial


def test_tie_rule_keeps_lowest_flat_index():
    a = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0, 2.0])
    masks = [torch.empty(6, dtype=torch.bool)]
    select_topk([a], 3, masks, None, "band")
    assert masks[0].tolist() == [False, True, True, False, True, False]


def test_band_hint_never_changes_the_result():
    """Whatever the hint (good, far off, tiny band, huge band), the mask is the exact top-k."""
    g = torch.Generator().manual_seed(2)
    a = torch.rand(5000, generator=g)
    kept = 1234
    expected = topk_mask_reference(a, kept)
    for hint in [None, BandHint(0.75, 1e-9), BandHint(0.01, 1e-3), BandHint(5.0, 10.0), BandHint(0.7534, 0.001)]:
        mask = torch.empty(5000, dtype=torch.bool)
        new_hint = select_topk([a], kept, [mask], hint, "band")
        assert torch.equal(mask, expected)
        assert new_hint.threshold == float(a[mask].min())


def test_band_tracks_a_moving_threshold_exactly():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(20000, generator=g)
    hint = None
    mask = torch.empty_like(s, dtype=torch.bool)
    for _ in range(30):
        s += 0.01 * torch.randn(s.shape, generator=g)
        hint = select_topk([s.abs()], 6000, [mask], hint, "band")
        assert torch.equal(mask, topk_mask_reference(s.abs(), 6000))


@pytest.mark.parametrize("k", [0.01, 0.3, 0.5, 0.99, 1.0])
def test_kept_count_is_algorithm1s(k):
    for n in [1, 7, 10, 99, 1000, 4097]:
        kept = kept_count(n, k)
        mask = GetSubnet.apply(torch.rand(n), k)
        assert kept == max(1, int(mask.sum()))
        assert abs(kept - k * n) < 1 or kept == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the compiled CPU backward, and PyTorch's
def test_linear_mask_and_score_gradient_equal_algorithm1(dtype):
    layer = popupify(nn.Linear(40, 30, bias=False), k=0.3, init="kaiming_normal", seed=4).to(dtype)
    weight, scores = layer._parameters["weight"], layer.scores
    x = torch.randn(8, 40, dtype=dtype)
    out = layer(x)
    (out**2).sum().backward()
    ref_scores = scores.detach().clone().requires_grad_(True)
    ref_out = F.linear(x, weight * GetSubnet.apply(ref_scores.abs(), 0.3))
    (ref_out**2).sum().backward()
    assert torch.equal(out, ref_out)
    assert torch.allclose(scores.grad, ref_scores.grad, rtol=1e-6, atol=1e-7)
    assert weight.grad is None


def test_conv_gradient_with_tied_scores_equals_algorithm1_counts_and_formula():
    conv = popupify(nn.Conv2d(3, 8, 3, padding=1, bias=False), k=0.5, seed=5)
    with torch.no_grad():  # many exact ties: scores from 4 magnitudes with random signs
        values = torch.randint(1, 5, conv.scores.shape).float() / 4
        conv.scores.copy_(values * torch.where(torch.rand(values.shape) < 0.5, -1.0, 1.0))
    x = torch.randn(2, 3, 6, 6)
    out = conv(x)
    out.sum().backward()
    mask = conv.weight.detach() != 0
    # Algorithm 1 keeps the same number; with ties, our rule picks the lowest flat indices among equals.
    assert int(mask.sum()) == int(GetSubnet.apply(conv.scores.detach().abs(), 0.5).sum())
    assert torch.equal(mask, topk_mask_reference(conv.scores.detach().abs(), int(mask.sum())))
    # grad(scores) = sign(s) * w * dL/dw_eff: compare with autograd through Algorithm 1 using our mask
    ref_scores = conv.scores.detach().clone().requires_grad_(True)
    w_eff = conv._parameters["weight"] * mask
    w_eff.requires_grad_(True)
    F.conv2d(x, w_eff, padding=1).sum().backward()
    expected = torch.sign(ref_scores.detach()) * conv._parameters["weight"] * w_eff.grad
    assert torch.allclose(conv.scores.grad, expected, rtol=1e-6, atol=1e-7)
    # and the full Algorithm 1 pipeline gives the same gradient where its mask agrees with ours
    ref_out = F.conv2d(x, conv._parameters["weight"] * GetSubnet.apply(ref_scores.abs(), 0.5), padding=1)
    ref_out.sum().backward()
    assert torch.allclose(ref_scores.grad, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- non-finite scores


def non_finite_mix(g, n, trial):
    """Scores of ``n`` entries from few levels (ties), signs mixed, with NaN, +inf and -inf mixed in; every few
    trials all NaN, all infinite, or mostly NaN."""
    s = (torch.randint(0, 4, (n,), generator=g) - 2).float() / 2
    r = torch.rand(n, generator=g)
    pattern = trial % 6
    if pattern == 0:
        s[:] = math.nan
    elif pattern == 1:
        s = torch.where(r < 0.5, math.inf, -math.inf)
    elif pattern == 2:  # mostly NaN: more NaNs than dropped entries at most k
        s[r < 0.8] = math.nan
    else:
        s[r < 0.2] = math.nan
        s[(r >= 0.2) & (r < 0.3)] = math.inf
        s[(r >= 0.3) & (r < 0.35)] = -math.inf
    return s


def by_hand(a, kept):
    """The rule spelled out: infinities, then numbers largest first, then NaNs; ties by flat index."""
    a = a.reshape(-1).tolist()
    rank = sorted(
        range(len(a)),
        key=lambda i: (
            -2 if a[i] == math.inf else 0 if math.isnan(a[i]) else -1,
            -a[i] if not math.isnan(a[i]) else 0,
            i,
        ),
    )
    mask = torch.zeros(len(a), dtype=torch.bool)
    mask[rank[:kept]] = True
    return mask


def test_non_finite_rule_by_hand():
    a = torch.tensor([math.nan, 1.0, math.inf, math.nan, 0.0, 2.0, math.inf])
    want = {
        1: [0, 0, 1, 0, 0, 0, 0],  # the first infinity
        2: [0, 0, 1, 0, 0, 0, 1],
        5: [0, 1, 1, 0, 1, 1, 1],  # every number, 0 included, before any NaN
        6: [1, 1, 1, 0, 1, 1, 1],  # then the NaN with the lowest index
        7: [1, 1, 1, 1, 1, 1, 1],
    }
    for kept, mask in want.items():
        assert topk_mask_reference(a, kept).tolist() == [bool(b) for b in mask], kept
        for strategy in ("band", "select"):
            out = torch.empty(7, dtype=torch.bool)
            select_topk([a.clone()], kept, [out], None, strategy)
            assert out.tolist() == [bool(b) for b in mask], (kept, strategy)


@pytest.mark.parametrize("strategy", ["band", "select"])
def test_non_finite_scores_every_path_the_same_mask(strategy):
    """NaN/inf mixes (all NaN, all infinite, more NaNs than dropped entries, sparse), per layer and over several
    parts (global scope), any kept count: exactly the rule's mask, no assertion."""
    g = torch.Generator().manual_seed(7)
    for trial in range(300):
        sizes = [int(torch.randint(1, 120, (1,), generator=g)) for _ in range(1 + trial % 3)]
        scores = [non_finite_mix(g, n, trial + i) for i, n in enumerate(sizes)]
        parts = [s.abs() for s in scores]
        kept = int(torch.randint(1, sum(sizes) + 1, (1,), generator=g))
        want = by_hand(torch.cat(parts), kept)
        assert torch.equal(topk_mask_reference(torch.cat(parts), kept), want), trial
        masks = [torch.empty(n, dtype=torch.bool) for n in sizes]
        select_topk(parts, kept, masks, None, strategy)
        assert torch.equal(torch.cat(masks), want), trial


def test_non_finite_scores_with_band_hints():
    """A run whose scores turn NaN and infinite step by step: the band's hints (carried over, good or far off)
    never change the mask."""
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3000, generator=g)
    hint = None
    mask = torch.empty(3000, dtype=torch.bool)
    for step in range(25):
        s += 0.01 * torch.randn(s.shape, generator=g)
        s[torch.randint(0, 3000, (150,), generator=g)] = math.nan if step % 3 else math.inf
        for kept in (1, 900, 2990):
            for h in (hint, BandHint(0.5, 0.1), BandHint(1e30, 1.0)):
                new = select_topk([s.abs()], kept, [mask], h, "band")
                assert torch.equal(mask, by_hand(s.abs(), kept)), (step, kept)
            if kept == 900:
                hint = new


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_nan_and_inf_scores_in_a_model(scope):
    """A popupified model whose scores went NaN (a whole layer, and more NaNs than a layer drops) and infinite:
    the forward keeps exactly the rule's entries on the pure-PyTorch band and select strategies."""
    from supermask_fx import gated_layers

    for strategy in ("band", "select"):
        torch.manual_seed(0)
        model = popupify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), k=0.3, scope=scope)
        pairs = list(gated_layers(model))
        with torch.no_grad():
            model[0].scores.fill_(math.nan)
            model[2].scores[:, :20] = math.nan
            model[2].scores[0, 25:] = -math.inf
        for _, gate in pairs:
            gate.selector.strategy = strategy
        model.eval()(torch.randn(2, 20))
        magnitudes = [m.scores.detach().abs().flatten() for m, _ in pairs]
        masks = [gate.layer_mask.tensor().flatten() for _, gate in pairs]
        if scope == "global":
            kept = pairs[0][1].selector.kept
            assert torch.equal(torch.cat(masks), by_hand(torch.cat(magnitudes), kept))
        else:
            for (_, gate), a, m in zip(pairs, magnitudes, masks):
                assert torch.equal(m, by_hand(a, gate.selector.kept))
        if scope == "layer":  # all NaN: the first kept entries; 50 numbers for 45 places: no NaN, every inf
            assert masks[0].tolist() == [i < pairs[0][1].selector.kept for i in range(600)]
            assert int(masks[1].sum()) == 45 and not masks[1][:20].any() and masks[1][25:30].all()
        else:  # 225 of 750 kept, 50 of them numbers: those, and the 175 NaNs of lowest flat index
            assert masks[0].tolist() == [i < 175 for i in range(600)] and int(masks[1].sum()) == 50
