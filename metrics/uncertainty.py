"""Uncertainty of a benchmark number: bootstrap intervals and paired tests (numpy only).

- :func:`bootstrap_ci`: the seeded percentile bootstrap over samples (Efron & Tibshirani 1993,
  ch. 13): ``B`` resamples of the ``n`` rows drawn with replacement by
  ``numpy.random.default_rng(seed).integers(0, n, (B, n))``, the statistic on each, and the
  ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the ``B`` values (numpy's linear
  interpolation), as ``scipy.stats.bootstrap(method="percentile")`` computes them.
- :func:`t_interval`: over runs (seeds) of one row, the Student-t interval of the runs' means,
  ``mean +- t_{(1+level)/2, k-1} s / sqrt(k)``.
- :func:`paired_permutation_test`: the paired (sign-flip) permutation test of the mean
  difference: under the null each pair's two values are exchangeable, so each difference keeps
  or flips its sign. Exact (all ``2^n`` sign patterns) when ``2^n <= n_resamples``, else
  ``n_resamples`` random patterns with the ``(count + 1) / (n_resamples + 1)`` correction; the
  two-sided p-value is ``min(1, 2 min(p_less, p_greater))``, as
  ``scipy.stats.permutation_test(permutation_type="samples", alternative="two-sided")``.
- :func:`paired_comparison`: mean difference, its bootstrap interval and the permutation
  p-value of two systems' values on the same samples.

The statistic of a resample defaults to the mean; :func:`pooled_psnr_statistic` gives the
pooled PSNR of rows that carry ``sse`` and ``n`` (a metric that is not a plain mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Statistic = Callable[[np.ndarray], np.ndarray]
"""Maps resample indices ``[B, n]`` to ``B`` statistic values."""

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


def mean_statistic(values: np.ndarray) -> Statistic:
    """The mean of ``values`` over each resample's indices."""
    values = np.asarray(values, dtype=np.float64)
    return lambda index: values[index].mean(axis=-1)


def pooled_psnr_statistic(sse: np.ndarray, counts: np.ndarray) -> Statistic:
    """The pooled PSNR ``10 log10(sum n / sum sse)`` of each resample (``[0, 1]`` images)."""
    sse = np.asarray(sse, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)

    def statistic(index: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return 10 * np.log10(counts[index].sum(axis=-1) / sse[index].sum(axis=-1))

    return statistic


@dataclass(frozen=True)
class Interval:
    """A point estimate and its interval."""

    estimate: float
    low: float
    high: float
    method: str

    def as_tuple(self) -> tuple[float, float]:
        return (self.low, self.high)


def bootstrap_ci(
    values: np.ndarray | None = None,
    *,
    statistic: Statistic | None = None,
    n: int | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Seeded percentile bootstrap interval over samples (see the module docstring).

    Pass ``values`` for the mean, or ``statistic`` and ``n`` for another statistic of ``n``
    rows. Fewer than 2 rows give a degenerate interval (nan bounds).
    """
    if statistic is None:
        if values is None:
            raise ValueError("pass `values` or `statistic` and `n`")
        values = np.asarray(values, dtype=np.float64)
        statistic, n = mean_statistic(values), len(values)
    if n is None:
        raise ValueError("`n` is required with `statistic`")
    estimate = float(statistic(np.arange(n)[None, :])[0]) if n else math.nan
    if n < 2:
        return Interval(estimate, math.nan, math.nan, "bootstrap")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, (n_resamples, n))
    replicates = statistic(index)
    alpha = (1 - level) / 2
    low, high = np.percentile(replicates, [100 * alpha, 100 * (1 - alpha)])
    return Interval(estimate, float(low), float(high), "bootstrap")


def t_interval(means: np.ndarray, level: float = DEFAULT_LEVEL) -> Interval:
    """Student-t interval of the mean of ``k`` run means (nan bounds for one run)."""
    means = np.asarray(means, dtype=np.float64)
    k = len(means)
    estimate = float(means.mean()) if k else math.nan
    if k < 2:
        return Interval(estimate, math.nan, math.nan, "t")
    from scipy.stats import t  # scipy comes with lpips (a requirement)

    half = float(t.ppf((1 + level) / 2, k - 1)) * float(means.std(ddof=1)) / math.sqrt(k)
    return Interval(estimate, estimate - half, estimate + half, "t")


def sign_patterns(n: int) -> np.ndarray:
    """All ``2^n`` sign patterns ``[2^n, n]`` of +-1 (row ``j``: the bits of ``j``)."""
    bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
    return 1 - 2 * bits.astype(np.float64)


def paired_permutation_test(
    a: np.ndarray, b: np.ndarray, *, n_resamples: int = 10000, seed: int = 0
) -> float:
    """Two-sided p-value of ``mean(a - b) = 0`` by sign flips (see the module docstring)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n == 0:
        return math.nan
    observed = d.mean()
    if n < 63 and 2**n <= n_resamples:
        signs, adjustment = sign_patterns(n), 0
    else:
        rng = np.random.default_rng(seed)
        signs, adjustment = rng.choice(np.array([-1.0, 1.0]), size=(n_resamples, n)), 1
    null = (signs * d).mean(axis=1)
    gamma = abs(1e-14 * observed)  # scipy's tolerance for ties of floating point statistics
    p_less = (np.count_nonzero(null <= observed + gamma) + adjustment) / (len(null) + adjustment)
    p_greater = (np.count_nonzero(null >= observed - gamma) + adjustment) / (
        len(null) + adjustment
    )
    return float(min(1.0, 2 * min(p_less, p_greater)))


@dataclass(frozen=True)
class Comparison:
    """``a - b`` on ``n`` shared samples."""

    n: int
    mean_a: float
    mean_b: float
    difference: Interval
    p_value: float


def paired_comparison(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    permutations: int = 10000,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Comparison:
    """Mean difference ``a - b`` of paired values, its percentile bootstrap interval (pairs
    resampled together) and the sign-flip permutation p-value."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    interval = bootstrap_ci(a - b, n_resamples=n_resamples, level=level, seed=seed)
    p = paired_permutation_test(a, b, n_resamples=permutations, seed=seed)
    mean_a = float(a.mean()) if len(a) else math.nan
    mean_b = float(b.mean()) if len(b) else math.nan
    return Comparison(len(a), mean_a, mean_b, interval, p)


__all__ = [
    "Comparison",
    "Interval",
    "bootstrap_ci",
    "mean_statistic",
    "paired_comparison",
    "paired_permutation_test",
    "pooled_psnr_statistic",
    "sign_patterns",
    "t_interval",
]
