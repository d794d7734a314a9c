"""Undefined results: which models and layers make a number undefined, and how outputs say so.

A similarity involving a layer whose activations are non-finite (a diverged model) or constant
over the examples (every centred kernel is 0) is 0/0: undefined. Analyses keep such values as
NaN in their arrays (.npz), write them as null with a reason in JSON, as "undefined (reason)"
in tables, and hatch them in figures. A mean over models (or model pairs) uses only those whose
every value is defined, and says which were left out and why; with none left it is undefined.
Nothing undefined is ever shown as 0, "none found" or another plausible value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

UNDEFINED = "undefined"


@dataclasses.dataclass(frozen=True)
class LayerStatus:
    """Per model and layer: finite (M, L) every activation is finite; varying (M, L) the layer
    differs between examples (on every minibatch, for minibatch CKA)."""

    finite: np.ndarray
    varying: np.ndarray
    layer_names: tuple[str, ...]

    @classmethod
    def of(cls, reps: Mapping[str, np.ndarray]) -> LayerStatus:
        """Status of representations name -> (M, n, ...)."""
        finite = np.stack([_finite(r) for r in reps.values()], 1)
        varying = np.stack([_varying(r) for r in reps.values()], 1)
        return cls(finite, varying, tuple(reps))

    @property
    def defined(self) -> np.ndarray:
        """(M, L) bool: the layer's similarities can be defined."""
        return self.finite & self.varying

    def select(self, names: Sequence[str]) -> LayerStatus:
        idx = [self.layer_names.index(n) for n in names]
        return LayerStatus(self.finite[:, idx], self.varying[:, idx], tuple(names))

    def models(self, models: slice | np.ndarray) -> LayerStatus:
        return LayerStatus(self.finite[models], self.varying[models], self.layer_names)

    def why(self, models: Sequence[int], label: str = "seed", layers: Sequence[int] | None = None) -> str:
        """Why `layers` (default: all) of `models` are undefined, e.g. 'non-finite activations in
        seed 1; constant layer s2b1 post in seed 0'; '' when every one of them is defined."""
        from cka_jax.analysis.plots import short_name

        models = sorted({int(m) for m in models})
        layers = range(len(self.layer_names)) if layers is None else sorted({int(i) for i in layers})
        parts = []
        bad = [m for m in models if not self.finite[m, layers].all()]
        if bad:
            parts.append(f"non-finite activations in {model_list(bad, label)}")
        for layer in layers:
            name = self.layer_names[layer]
            constant = [m for m in models if m not in bad and not self.varying[m, layer]]
            if constant:
                parts.append(f"constant layer {short_name(name)} in {model_list(constant, label)}")
        return "; ".join(shorten(parts))


def _finite(r: np.ndarray) -> np.ndarray:
    """(M, n, ...) -> (M,) bool: every value of the model is finite."""
    return np.isfinite(r).reshape(r.shape[0], math.prod(r.shape[1:])).all(1)


def _varying(r: np.ndarray) -> np.ndarray:
    """(M, n, ...) -> (M,) bool: the model's values differ between the n examples."""
    return (r != r[:, :1]).reshape(r.shape[0], math.prod(r.shape[1:])).any(1)


def measurable(reps: np.ndarray) -> np.ndarray:
    """(M, n, ...) -> (M,) bool: a similarity with each model's values can be defined (they are
    all finite and not constant over the n examples; see `LayerStatus`)."""
    reps = np.asarray(reps)
    return _finite(reps) & _varying(reps)


def status_update(finite: jax.Array, varying: jax.Array, reps: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Folds one minibatch of layers (M, B, ...) each into the running (M, L) status (jittable)."""
    flat = [r.reshape(r.shape[:2] + (-1,)) for r in reps]
    batch_finite = jnp.stack([jnp.isfinite(r).all((1, 2)) for r in flat], 1)
    batch_varying = jnp.stack([(r != r[:, :1]).any((1, 2)) for r in flat], 1)
    return finite & batch_finite, varying & batch_varying


def model_list(models: Sequence[int], label: str = "seed") -> str:
    """'seed 1' or 'seeds 0, 2'."""
    models = list(models)
    return f"{label} {models[0]}" if len(models) == 1 else f"{label}s {', '.join(map(str, models))}"


def shorten(parts: Sequence[str], limit: int = 4) -> list[str]:
    """At most `limit` parts, the rest counted."""
    parts = list(parts)
    return parts if len(parts) <= limit else parts[:limit] + [f"{len(parts) - limit} more"]


def is_defined(value) -> bool:
    return value is not None and math.isfinite(float(value))


def number(value, digits: int = 3, reason: str = "", sign: bool = False) -> str:
    """A table cell: the value, or 'undefined (reason)'."""
    if not is_defined(value):
        return f"{UNDEFINED} ({reason})" if reason else UNDEFINED
    return f"{float(value):{'+' if sign else ''}.{digits}f}"


def interval(mean, low, high, digits: int = 3, reason: str = "") -> str:
    """'0.912 [0.901, 0.925]', or 'undefined (reason)'."""
    if not is_defined(mean):
        return number(mean, digits, reason)
    return f"{float(mean):.{digits}f} [{float(low):.{digits}f}, {float(high):.{digits}f}]"


def defined_rows(values: np.ndarray) -> np.ndarray:
    """(K, ...) -> (K,) bool: rows whose every value is finite."""
    values = np.asarray(values, np.float64)
    # Not reshape(K, -1): with K = 0 (no model left, e.g. every seed diverged) -1 is ambiguous.
    return np.isfinite(values.reshape(values.shape[0], math.prod(values.shape[1:]))).all(1)


def mean_of_defined(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the rows of `values` (K, ...) whose every value is finite, and those rows (K,);
    all NaN when no row is defined."""
    values = np.asarray(values, np.float64)
    rows = defined_rows(values)
    if not rows.any():
        return np.full(values.shape[1:], np.nan), rows
    return values[rows].mean(0), rows


def left_out(
    defined: np.ndarray, why: Callable[[int], str], label: str = "seed", name: Callable[[int], str] | None = None
) -> str:
    """'' when every row is defined; else e.g. 'mean over 2 of 3 seeds: seed 1 left out as
    undefined (non-finite activations in seed 1)', or 'undefined for every seed (...)'.
    why(row): the reason; name(row): how to call a row (default: '<label> <row>')."""
    defined = np.asarray(defined, bool)
    bad = np.flatnonzero(~defined).tolist()
    if not bad:
        return ""
    reasons = "; ".join(shorten(list(dict.fromkeys(r for r in (why(i) for i in bad) if r))))
    reasons = f" ({reasons})" if reasons else ""
    if not defined.any():
        return f"{UNDEFINED} for every {label}{reasons}"
    names = ", ".join(shorten([name(i) for i in bad])) if name else model_list(bad, label)
    return f"mean over {int(defined.sum())} of {len(defined)} {label}s: {names} left out as undefined{reasons}"


def strict_json(value):
    """`value` with every non-finite float (also inside numpy arrays) replaced by None."""
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
