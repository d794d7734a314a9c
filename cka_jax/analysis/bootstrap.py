"""Percentile bootstrap intervals for the single numbers the paper reports (over seeds or examples)."""

from __future__ import annotations

import numpy as np

from cka_jax.analysis.undefined import defined_rows, interval


def bootstrap_mean(
    values: np.ndarray, num_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of `values` (K, ...) over axis 0 and its percentile bootstrap interval from resampling
    the K rows with replacement: (mean, low, high), each of shape values.shape[1:].

    Only rows whose every value is finite take part (see `undefined.defined_rows`, which callers
    use to say which were left out); with none, all three are NaN. With one, the interval
    collapses to the value.
    """
    values = np.asarray(values, np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError(f"need values of shape (K, ...) with K >= 1, got {values.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    kept = values[defined_rows(values)]
    if len(kept) == 0:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan, nan
    k = len(kept)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, k, (num_resamples, k))
    # Resample counts times the rows: (R, K) @ (K, P) instead of an (R, K, P) gather.
    counts = np.zeros((num_resamples, k))
    np.add.at(counts, (np.arange(num_resamples)[:, None], rows), 1.0)
    means = (counts @ kept.reshape(k, -1) / k).reshape((num_resamples,) + values.shape[1:])
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return kept.mean(0), low, high


def format_interval(
    mean: float | np.ndarray, low: float | np.ndarray, high: float | np.ndarray, digits: int = 3, reason: str = ""
) -> str:
    """'0.912 [0.901, 0.925]', or 'undefined (reason)' for a non-finite mean."""
    return interval(mean, low, high, digits, reason)
