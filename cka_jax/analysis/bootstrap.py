"""Percentile bootstrap intervals for the single numbers the paper reports (over seeds or examples)."""
from __future__ import annotations

import warnings

import numpy as np


def bootstrap_mean(values: np.ndarray, num_resamples: int = 1000, level: float = 0.95,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of `values` (K, ...) over axis 0 and its percentile bootstrap interval from resampling
    the K rows with replacement: (mean, low, high), each of shape values.shape[1:]. NaN rows are
    ignored; with K = 1 the interval collapses to the value."""
    values = np.asarray(values, np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError(f"need values of shape (K, ...) with K >= 1, got {values.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, values.shape[0], (num_resamples, values.shape[0]))
    alpha = (1 - level) / 2
    with warnings.catch_warnings():  # all-NaN resamples give NaN, which is the right answer
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(values[rows], axis=1)
        low, high = np.nanquantile(means, [alpha, 1 - alpha], axis=0)
        return np.nanmean(values, axis=0), low, high


def format_interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    """'0.912 [0.901, 0.925]'."""
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
