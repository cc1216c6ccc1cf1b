"""Confidence intervals of evaluation figures (means over seeds), with no dependency beyond the standard library.

The benchmarks report a mean over independent runs (seeds) with a 95 % interval from Student's t, and the
difference of two arms' means with Welch's interval (unequal variances, Welch-Satterthwaite degrees of
freedom, rounded down so the interval errs wide).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: float) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (rounded down; beyond 30 the
    approximation ``1.96 + 2.5 / df``, within 0.002 of the exact value)."""
    if not df >= 1:
        raise ValueError(f"need at least 1 degree of freedom, got {df}")
    k = int(math.floor(df))
    return _T975[k - 1] if k <= len(_T975) else 1.96 + 2.5 / k


def mean_ci95(xs: Sequence[float]) -> tuple[float, float]:
    """``(mean, half-width)`` of the 95 % interval of the mean of ``xs``; the half-width is ``inf`` for one value."""
    if not xs:
        raise ValueError("the mean of no values")
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, math.inf
    return m, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def diff_ci95(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(mean(a) - mean(b), half-width)`` of Welch's 95 % interval; ``inf`` when either side has one value.
    Two sets with no spread at all give a half-width of 0."""
    if not a or not b:
        raise ValueError("a difference needs values on both sides")
    d = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return d, math.inf
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return d, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return d, t975(df) * math.sqrt(va + vb)


def paired_diff_ci95(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """``(mean of a[k] - b[k], half-width, pairs)`` over the keys in both (runs paired by seed: the same
    evaluation seeds and prompts on both sides, so the noise they share cancels); ``inf`` with one pair."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("a paired difference needs at least one key on both sides")
    m, half = mean_ci95([a[k] - b[k] for k in keys])
    return m, half, len(keys)
