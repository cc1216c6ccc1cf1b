"""Confidence intervals of the benchmarks' figures, checked by hand."""

import math

import pytest

from core.stats import diff_ci95, mean_ci95, t975


def test_t_quantiles():
    assert t975(1) == 12.706 and t975(4) == 2.776 and t975(4.9) == 2.776  # rounded down: wider
    assert t975(60) == pytest.approx(2.000, abs=0.003) and t975(1000) == pytest.approx(1.96, abs=0.003)
    with pytest.raises(ValueError):
        t975(0.5)


def test_mean_interval_by_hand():
    m, h = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])  # sd sqrt(2.5), n 5, t(4) 2.776
    assert m == 3.0 and h == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    assert mean_ci95([7.0]) == (7.0, math.inf)
    with pytest.raises(ValueError):
        mean_ci95([])


def test_welch_difference_by_hand():
    a, b = [10.0, 12.0, 14.0], [1.0, 2.0, 3.0, 4.0, 5.0]
    d, h = diff_ci95(a, b)
    va, vb = 4.0 / 3, 2.5 / 5
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 4)  # 3.53: t(3)
    assert d == 9.0 and df == pytest.approx(3.53, abs=0.01) and h == pytest.approx(3.182 * math.sqrt(va + vb))
    assert diff_ci95([2.0, 2.0], [1.0, 1.0]) == (1.0, 0.0)
    assert diff_ci95([2.0], [1.0, 3.0])[1] == math.inf


def test_paired_difference_uses_the_common_keys():
    from core.stats import paired_diff_ci95

    a, b = {0: 10.0, 1: 12.0, 2: 11.0, 9: 99.0}, {0: 9.0, 1: 10.0, 2: 11.0}
    d, h, n = paired_diff_ci95(a, b)  # diffs 1, 2, 0: mean 1, sd 1, t(2) 4.303
    assert (d, n) == (1.0, 3) and h == pytest.approx(4.303 / math.sqrt(3))
    assert paired_diff_ci95({0: 2.0}, {0: 1.0})[1] == math.inf
    with pytest.raises(ValueError):
        paired_diff_ci95({0: 1.0}, {1: 1.0})
