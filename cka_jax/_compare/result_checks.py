"""The checks a `CKAComparison` runs when it is made (by `compare`, or read back from a file):
contents no comparison can have are a one-line ValueError naming the field, never shown as a
plausible result."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def check_comparison(result: Any) -> None:
    """ValueError (one line, naming the field) for a `CKAComparison` whose contents no comparison
    can have: they would be shown as a plausible result, or make repr and plot fail."""
    _check_fields(result)
    lead = (2 if result.all_pairs else 1) if result.population else 0
    shape = np.shape(result.heatmap)
    if len(shape) != lead + 2 or shape[lead:] != (len(result.layers_a), len(result.layers_b)):
        raise ValueError(
            f"heatmap of shape {shape} does not fit {len(result.layers_a)} x {len(result.layers_b)} layers "
            f"(population={result.population}, all_pairs={result.all_pairs})"
        )
    if result.interval is not None and any(np.shape(b) != shape for b in result.interval):
        raise ValueError(f"interval bounds must have the heatmap's shape {shape}")
    if not (_is_integer(result.num_permutations) and result.num_permutations >= 0):
        raise ValueError(f"num_permutations must be an integer >= 0, got {result.num_permutations!r}")
    if (result.p_values is None) != (result.num_permutations == 0):
        raise ValueError(f"p_values need num_permutations >= 1 and back, got {result.num_permutations!r}")
    if result.p_values is not None:
        p = np.asarray(result.p_values, np.float64)
        if p.shape != shape or ((p <= 0) | (p > 1)).any():
            raise ValueError(f"p_values must have the heatmap's shape {shape} and lie in (0, 1] (NaN: undefined)")


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_real_array(value, name: str) -> None:
    """ValueError unless `value` holds real numbers, none infinite (NaN marks an undefined value)."""
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold real numbers (CKA values), got dtype {array.dtype}")
    if np.isinf(array).any():
        raise ValueError(f"{name} holds infinite values; CKA is at most 1 in size, and undefined entries are NaN")


def _check_fields(result: Any) -> None:
    """ValueError naming the first field of `result` that no comparison can have."""
    for flag in ("debiased", "population", "all_pairs"):
        if not isinstance(getattr(result, flag), (bool, np.bool_)):
            raise ValueError(f"{flag} must be True or False, got {getattr(result, flag)!r}")
    for side in ("a", "b"):
        layers, name = getattr(result, f"layers_{side}"), getattr(result, f"name_{side}")
        if isinstance(layers, str) or not all(isinstance(n, str) for n in layers) or not len(layers):
            raise ValueError(f"layers_{side} must be one or more layer names (strings), got {layers!r}")
        if not isinstance(name, str):
            raise ValueError(f"name_{side} must be a string, got {name!r}")
    examples, minibatches = result.num_examples, result.num_minibatches
    if not (_is_integer(examples) and _is_integer(minibatches) and examples >= minibatches >= 1):
        raise ValueError(
            f"num_examples={examples!r}, num_minibatches={minibatches!r}: must be integers with "
            "num_examples >= num_minibatches >= 1 (every minibatch holds examples)"
        )
    if result.kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {result.kernel!r}")
    if not (_is_real(result.threshold) and 0 < result.threshold < math.inf):
        raise ValueError(f"threshold must be a positive finite number, got {result.threshold!r}")
    if not (_is_integer(result.num_bootstrap) and result.num_bootstrap >= 0):
        raise ValueError(f"num_bootstrap must be an integer >= 0, got {result.num_bootstrap!r}")
    if result.level is not None and not (_is_real(result.level) and 0 < result.level < 1):
        raise ValueError(f"level must lie in (0, 1) or be None, got {result.level!r}")
    if result.interval is not None and (result.level is None or result.num_bootstrap < 1):
        raise ValueError(
            f"an interval needs its level and num_bootstrap >= 1, got level={result.level!r}, "
            f"num_bootstrap={result.num_bootstrap!r}"
        )
    if result.all_pairs and not result.population:
        raise ValueError("all_pairs=True needs population=True (every model pair of two populations)")
    if not result.debiased and (result.population or result.interval is not None):
        raise ValueError("debiased=False (whole-set CKA) has neither populations nor bootstrap intervals")
    _check_real_array(result.heatmap, "heatmap")
    if result.interval is not None:
        if not isinstance(result.interval, (tuple, list)) or len(result.interval) != 2:
            raise ValueError("interval must be a pair of arrays (low, high) or None")
        for bound, value in zip(("interval low", "interval high"), result.interval, strict=True):
            _check_real_array(value, bound)
