"""Verdicts from seeds: a difference of means with its 95 % interval (Welch), and the rule that reads it.

A comparison is a *contrast* of configuration means, ``c = sum_i w_i * mean_i`` (``A - B`` has weights +1, -1;
a gap difference ``(dense_a - popup_a) - (dense_b - popup_b)`` has four). Each configuration ``i`` contributes its
per-seed accuracies ``x_i`` (``n_i >= 2`` seeds, sample variance ``s_i^2``), the seeds of different configurations
being independent. Then

    se^2 = sum_i w_i^2 s_i^2 / n_i,
    df   = se^4 / sum_i (w_i^2 s_i^2 / n_i)^2 / (n_i - 1)        (Welch-Satterthwaite),
    95 % interval = c -+ t_{0.975, df} * se.

Rules (``decide``), each fixed before the runs are made (``protocol.py``):

* ``">"`` (the claim says ``c > 0``): *supported* if the interval lies above 0, *contradicted* if it lies below 0,
  else *inconclusive*.
* ``">="`` with margin ``m`` (non-inferiority: "A is at least as good as B"): *supported* if the interval lies
  above ``-m``, *contradicted* if it lies below ``-m``, else *inconclusive*.
* ``"~"`` with margin ``m`` (equivalence): *supported* if the interval lies inside ``(-m, m)``, *contradicted* if it
  lies wholly outside it (above ``m`` or below ``-m``), else *inconclusive*.

With fewer than 2 seeds in any configuration there is no interval: *inconclusive (n < 2)*. When every
configuration's seeds agree exactly (all ``s_i = 0``) the interval is the point ``c``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "contrast", "decide", "SUPPORTED", "CONTRADICTED", "INCONCLUSIVE", "LEVEL"]

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A contrast's estimate and its two-sided ``LEVEL`` interval (``low``/``high`` are nan without one)."""

    estimate: float
    low: float
    high: float
    df: float
    seeds: tuple[int, ...]

    @property
    def defined(self) -> bool:
        return not math.isnan(self.low)

    def text(self, unit: str = " pts") -> str:
        if not self.defined:
            return f"{self.estimate:+.2f}{unit} (no interval: seeds {self.seeds})"
        return f"{self.estimate:+.2f}{unit} [{self.low:+.2f}, {self.high:+.2f}]"


def _t_quantile(df: float) -> float:
    try:
        from scipy.stats import t
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the reproduction's verdicts need scipy (Student's t quantile): pip install 'supermask-fx[repro]'"
        ) from error
    return float(t.ppf(0.5 + LEVEL / 2, df))


def contrast(terms: Sequence[tuple[float, Sequence[float]]]) -> Interval:
    """``sum_i w_i * mean(x_i)`` and its Welch interval, from ``[(w_i, x_i), ...]`` (see the module docstring)."""
    seeds = tuple(len(values) for _, values in terms)
    if not terms or min(seeds) == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, seeds)
    estimate = sum(w * statistics.fmean(values) for w, values in terms)
    if min(seeds) < 2:
        return Interval(estimate, math.nan, math.nan, math.nan, seeds)
    parts = [w * w * statistics.variance(values) / len(values) for w, values in terms]
    se2 = sum(parts)
    if se2 == 0.0:
        return Interval(estimate, estimate, estimate, math.inf, seeds)
    df = se2 * se2 / sum(p * p / (len(values) - 1) for p, (_, values) in zip(parts, terms, strict=True))
    half = _t_quantile(df) * math.sqrt(se2)
    return Interval(estimate, estimate - half, estimate + half, df, seeds)


def decide(interval: Interval, relation: str, margin: float = 0.0) -> str:
    """The verdict of ``interval`` under ``relation`` (``">"``, ``">="``, ``"~"``) and ``margin`` (points)."""
    if relation not in (">", ">=", "~"):
        raise ValueError(f"relation must be '>', '>=' or '~', got {relation!r}")
    if not interval.defined:
        return f"{INCONCLUSIVE} (n < 2)"
    low, high = interval.low, interval.high
    if relation == ">":
        return SUPPORTED if low > 0 else CONTRADICTED if high < 0 else INCONCLUSIVE
    if relation == ">=":
        return SUPPORTED if low > -margin else CONTRADICTED if high < -margin else INCONCLUSIVE
    if -margin < low and high < margin:
        return SUPPORTED
    return CONTRADICTED if low > margin or high < -margin else INCONCLUSIVE
