"""metrics.uncertainty against scipy.stats on fabricated per-sample data.

The percentile bootstrap draws its resamples as scipy does (``rng.integers(0, n, (B, n))``), so
with the same generator seed the intervals agree to float precision; the paired permutation
p-value is checked against ``scipy.stats.permutation_test(permutation_type="samples")`` (exact
enumeration at n=8, Monte Carlo within its error at n=40) and a hand enumeration of the 256
sign patterns.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from metrics.uncertainty import (
    bootstrap_ci,
    paired_comparison,
    paired_permutation_test,
    pooled_psnr_statistic,
    t_interval,
)


def _mean_diff(x, y, axis=-1):
    return np.mean(x - y, axis=axis)


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    values = np.random.default_rng(1).gamma(2.0, 0.05, size=60)
    ours = bootstrap_ci(values, n_resamples=2000, seed=7)
    ref = stats.bootstrap(
        (values,),
        np.mean,
        n_resamples=2000,
        method="percentile",
        confidence_level=0.95,
        vectorized=True,
        rng=np.random.default_rng(7),
    ).confidence_interval
    assert ours.estimate == pytest.approx(values.mean())
    # Same generator, same draws: equal up to float summation order.
    assert ours.low == pytest.approx(ref.low, rel=1e-9)
    assert ours.high == pytest.approx(ref.high, rel=1e-9)


def test_bootstrap_ci_independent_seed_within_monte_carlo_error():
    values = np.random.default_rng(2).normal(0.3, 0.1, size=200)
    ours = bootstrap_ci(values, n_resamples=4000, seed=0)
    ref = stats.bootstrap(
        (values,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(99)
    ).confidence_interval
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(ours.low - ref.low) < 0.15 * se
    assert abs(ours.high - ref.high) < 0.15 * se
    assert ours.low < values.mean() < ours.high


def test_bootstrap_is_seeded():
    values = np.arange(30.0)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_pooled_psnr_statistic_resamples_sums():
    rng = np.random.default_rng(0)
    sse, counts = rng.random(20) * 5, np.full(20, 3072.0)
    interval = bootstrap_ci(statistic=pooled_psnr_statistic(sse, counts), n=20, seed=1)
    assert interval.estimate == pytest.approx(10 * np.log10(counts.sum() / sse.sum()))
    index = np.random.default_rng(1).integers(0, 20, (1000, 20))
    reps = 10 * np.log10(counts[index].sum(1) / sse[index].sum(1))
    assert interval.low == pytest.approx(np.percentile(reps, 2.5))
    assert interval.high == pytest.approx(np.percentile(reps, 97.5))


def test_t_interval_over_seeds_matches_scipy():
    means = np.array([0.101, 0.097, 0.105])
    ours = t_interval(means)
    low, high = stats.t.interval(0.95, 2, loc=means.mean(), scale=stats.sem(means))
    assert (ours.low, ours.high) == pytest.approx((low, high))


def test_permutation_exact_n8_matches_enumeration_and_scipy():
    rng = np.random.default_rng(5)
    a, b = rng.random(8), rng.random(8)
    d = a - b
    observed = d.mean()
    null = [np.mean(np.array(s) * d) for s in itertools.product((1, -1), repeat=8)]
    p_less = np.mean([v <= observed + 1e-15 for v in null])
    p_greater = np.mean([v >= observed - 1e-15 for v in null])
    by_hand = min(1.0, 2 * min(p_less, p_greater))
    ours = paired_permutation_test(a, b)
    ref = stats.permutation_test(
        (a, b), _mean_diff, permutation_type="samples", vectorized=True, n_resamples=10000
    ).pvalue
    assert ours == pytest.approx(by_hand, abs=1e-12)
    assert ours == pytest.approx(ref, abs=1e-12)


def test_permutation_monte_carlo_matches_scipy_within_error():
    rng = np.random.default_rng(6)
    a = rng.normal(0, 1, 40)
    b = a + rng.normal(0.15, 1, 40)
    ours = paired_permutation_test(a, b, n_resamples=20000, seed=0)
    ref = stats.permutation_test(
        (a, b),
        _mean_diff,
        permutation_type="samples",
        vectorized=True,
        n_resamples=20000,
        rng=np.random.default_rng(1),
    ).pvalue
    assert abs(ours - ref) < 4 * np.sqrt(ref * (1 - ref) / 20000) + 1e-3


def test_known_effect_is_significant_and_null_is_not():
    rng = np.random.default_rng(7)
    base = rng.random(50)
    better = base - 0.05 + rng.normal(0, 0.01, 50)
    effect = paired_comparison(better, base, seed=0)
    assert effect.p_value < 0.05
    assert effect.difference.high < 0  # the whole interval below 0
    same = base + rng.normal(0, 0.01, 50)
    null = paired_comparison(same, base, seed=0)
    assert null.p_value > 0.05
    assert null.difference.low < 0 < null.difference.high


def test_identical_systems_have_p_one():
    a = np.linspace(0, 1, 12)
    assert paired_permutation_test(a, a.copy()) == 1.0
