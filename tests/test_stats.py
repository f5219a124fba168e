"""The verdict statistics (supermask_fx/experiments/stats.py) against scipy's Welch t-test, computed independently."""

import math

import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from supermask_fx.experiments.stats import contrast, decide  # noqa: E402


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([97.8, 97.9, 97.85], [96.7, 96.9, 96.6]),
        ([80.0, 82.0, 84.0], [81.0, 83.0, 85.0]),
        ([70.1, 70.3, 69.9, 70.4], [70.2, 70.0]),
    ],
)
def test_difference_interval_is_welch(a, b):
    interval = contrast([(1.0, a), (-1.0, b)])
    reference = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert interval.estimate == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert interval.low == pytest.approx(reference.low)
    assert interval.high == pytest.approx(reference.high)


def test_gap_contrast_of_four_groups():
    dense_s, popup_s, dense_l, popup_l = [98.0, 98.2, 98.1], [96.0, 96.4, 96.2], [98.3, 98.4, 98.2], [97.9, 98.0, 98.1]
    interval = contrast([(1, dense_s), (-1, popup_s), (-1, dense_l), (1, popup_l)])
    # by hand: gap 1.9 - 0.3 = 1.6; every group has variance 0.01 except popup_s (0.04)
    assert interval.estimate == pytest.approx(1.6)
    se2 = (0.01 + 0.04 + 0.01 + 0.01) / 3
    df = se2**2 / sum((v / 3) ** 2 / 2 for v in (0.01, 0.04, 0.01, 0.01))
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(se2)
    assert (interval.low, interval.high) == pytest.approx((1.6 - half, 1.6 + half))
    assert decide(interval, ">") == "supported"


def test_rules_and_edge_cases():
    point = contrast([(1.0, [80.0, 80.0]), (-1.0, [79.0, 79.0])])  # no spread: the interval is the point
    assert (point.low, point.high) == (1.0, 1.0)
    assert decide(point, ">") == "supported"
    assert decide(point, "~", 0.5) == "contradicted"
    assert decide(point, "~", 2.0) == "supported"
    assert decide(contrast([(1.0, [80.0]), (-1.0, [79.0, 79.5])]), ">") == "inconclusive (n < 2)"
    assert decide(contrast([(1.0, [79.0, 79.1, 79.2]), (-1.0, [80.0, 80.1, 80.2])]), ">=", 0.5) == "contradicted"
    with pytest.raises(ValueError, match="relation"):
        decide(point, "<")
