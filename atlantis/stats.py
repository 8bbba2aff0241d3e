"""Small statistics shared by the tiny-world experiment and the report: paired t-intervals over seeds."""

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
