"""Small statistics shared by the tiny-world experiment, the map and the report: paired t-intervals over seeds,
and a two-level bootstrap over pre-trained worlds and seeds."""

from __future__ import annotations

import math

import numpy as np

# Student-t 0.975 quantiles by degrees of freedom; beyond 30 the df=30 value (2.042) is used, slightly wide.
T975 = dict(
    enumerate(
        [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
        + [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042],
        start=1,
    )
)


def paired_ci(diffs: np.ndarray) -> tuple[float, float, float]:
    """Mean paired difference and its 95% t-interval over seeds (NaN interval with one seed)."""
    n = len(diffs)
    mean = float(np.mean(diffs))
    if n < 2:
        return mean, math.nan, math.nan
    half = T975[min(n - 1, 30)] * float(np.std(diffs, ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def two_level_bootstrap(
    groups: list[np.ndarray], n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of the group means and a two-level (hierarchical) percentile bootstrap interval.

    Each replicate resamples the groups (pre-trained worlds) with replacement, then the values (paired
    differences over fine-tuning seeds) within each drawn group with replacement, and averages the drawn
    groups' means: the interval carries the variation between worlds as well as within them. With few groups
    it is narrow (3 worlds give at most 10 distinct resamples at the first level); read it with that in mind.
    """
    groups = [np.asarray(g, dtype=float) for g in groups]
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("two_level_bootstrap needs at least one group, and no empty group")
    estimate = float(np.mean([g.mean() for g in groups]))
    rng = np.random.default_rng(seed)
    k = len(groups)
    picked = rng.integers(k, size=(n_boot, k))  # first level: which worlds each replicate draws
    # second level, independent for every draw: means[j, i, b] = a resample's mean of group i at draw j
    means = np.stack(
        [np.stack([g[rng.integers(len(g), size=(n_boot, len(g)))].mean(axis=1) for g in groups]) for _ in range(k)]
    )
    stats = means[np.arange(k)[None, :], picked, np.arange(n_boot)[:, None]].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return estimate, float(low), float(high)
