"""Paired comparisons of pass@1: the bootstrap interval, exact McNemar and Wilson against known values."""

import math

import numpy as np
import pytest

from qtrain.stats import compare_paired, mcnemar_exact, paired_bootstrap, wilson_interval


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact(3, 3) == 1.0  # capped at 1
    assert mcnemar_exact(2, 7) == mcnemar_exact(7, 2)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(22, 500)
    assert lo == pytest.approx(0.0292, abs=1e-3) and hi == pytest.approx(0.0658, abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


def test_bootstrap_interval_brackets_the_difference_and_is_reproducible():
    rng = np.random.default_rng(1)
    before = rng.random(164) < 0.05
    after = before | (rng.random(164) < 0.10)  # gains only
    lo, hi = paired_bootstrap(before, after, seed=3)
    diff = after.mean() - before.mean()
    assert lo <= diff <= hi and lo > 0
    assert paired_bootstrap(before, after, seed=3) == (lo, hi)
    assert paired_bootstrap(before, before) == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def test_two_problems_out_of_164_is_not_a_gain():
    before = {f"t{i}": 1.0 if i < 9 else 0.0 for i in range(164)}
    after = dict(before, t100=1.0, t101=1.0)
    r = compare_paired(before, after)
    assert r.difference == pytest.approx(2 / 164)
    assert not r.significant and r.ci_low <= 0 <= r.ci_high
    assert (r.only_before, r.only_after) == (0, 2) and r.mcnemar_p == pytest.approx(0.5)
    assert "no significant difference" in r.describe()


def test_a_large_paired_gain_is_significant_and_fractional_scores_work():
    before = {f"t{i}": 0.0 for i in range(100)}
    after = {f"t{i}": 1.0 if i < 20 else 0.0 for i in range(100)}
    r = compare_paired(before, after)
    assert r.significant and r.ci_low > 0 and r.mcnemar_p < 1e-5 and "better" in r.describe()
    frac = compare_paired({"a": 0.25, "b": 0.5}, {"a": 0.5, "b": 0.5, "c": 1.0})
    assert frac.n == 2 and frac.only_before is None and frac.mcnemar_p is None
    assert math.isclose(frac.difference, 0.125)
    with pytest.raises(ValueError, match="share no problems"):
        compare_paired({"a": 1.0}, {"b": 1.0})
