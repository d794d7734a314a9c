"""Convergent learning (Li et al. 2016): unit matching and sparse prediction across networks.

Representations are `x: (n, ...)`, `y: (n, ...)` with the same `n` examples first; trailing
dims are flattened to `p` and `q` units. A unit with zero variance (e.g. a dead ReLU) has an
undefined (NaN) correlation with every unit; matchings never pair a unit with it when a real
unit is available, and pairs whose correlation is NaN are left out of the result.
"""
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import Lasso

from cka_jax.hsic import HIGHEST, as_matrix, center_features

MATCHING_METHODS = ("bipartite", "semi")


class UnitMatching(NamedTuple):
    """Matched unit pairs, ordered by x unit.

    x_units: (m,) int indices into x's units.
    y_units: (m,) int indices into y's units.
    correlations: (m,) float Pearson correlation of each pair.
    """

    x_units: np.ndarray
    y_units: np.ndarray
    correlations: np.ndarray


def _check_pair(x: jax.Array, y: jax.Array) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of `x: (n, ...)` and `y: (n, ...)`; ValueError unless both are ≥ 2-D with the same n."""
    shape_x, shape_y = jnp.shape(x), jnp.shape(y)
    if len(shape_x) < 2 or len(shape_y) < 2 or shape_x[0] != shape_y[0]:
        raise ValueError(
            f"x and y must be (n, ...) arrays with the same number n of examples; got {shape_x} and {shape_y}"
        )
    return shape_x, shape_y


@jax.jit
def _correlations(x: jax.Array, y: jax.Array) -> jax.Array:
    xc, yc = center_features(as_matrix(x)), center_features(as_matrix(y))
    xs = xc / jnp.linalg.norm(xc, axis=0)
    ys = yc / jnp.linalg.norm(yc, axis=0)
    return jnp.clip(jnp.matmul(xs.T, ys, precision=HIGHEST), -1.0, 1.0)


def unit_correlations(x: jax.Array, y: jax.Array) -> jax.Array:
    """Pearson correlations between units of `x: (n, ...)` and `y: (n, ...)`: `(p, q)`.

    Entries involving a zero-variance unit are NaN.
    """
    _check_pair(x, y)
    return _correlations(x, y)


def match_units(x: jax.Array, y: jax.Array, method: str = "bipartite") -> UnitMatching:
    """Match units of `x: (n, ...)` to units of `y: (n, ...)` by correlation.

    "bipartite": one-to-one assignment of min(p, q) pairs maximising the total correlation
    (`scipy.optimize.linear_sum_assignment`), first maximising the number of pairs with a
    defined correlation. "semi": each unit of x to its best-correlated unit of y (several x
    units may share a y unit). Pairs with NaN correlation are dropped (see module docstring).
    """
    if method not in MATCHING_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {MATCHING_METHODS}")
    corr = np.asarray(unit_correlations(x, y), dtype=np.float64)
    defined = np.isfinite(corr)
    if method == "bipartite":
        # With m = min(p, q) pairs, any assignment using a NaN pair (scored -2m) totals at most
        # -2m + (m - 1) < -m, below every assignment of real pairs.
        score = np.where(defined, corr, -2.0 * min(corr.shape))
        rows, cols = linear_sum_assignment(score, maximize=True)
    else:
        rows = np.arange(corr.shape[0])
        cols = np.argmax(np.where(defined, corr, -np.inf), axis=1)
    keep = defined[rows, cols]
    return UnitMatching(rows[keep], cols[keep], corr[rows, cols][keep])


def _standardise(a: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Standardise units with the training split's mean and std (constant units become 0)."""
    mean = a[train].mean(axis=0)
    std = a[train].std(axis=0)
    return (a - mean) / np.where(std > 0, std, 1.0)


def sparse_prediction_loss(
    x: jax.Array,
    y: jax.Array,
    l1_penalties: Sequence[float],
    holdout: float = 0.25,
    seed: int = 0,
) -> np.ndarray:
    """Mean squared error of predicting each unit of `y: (n, ...)` from all units of `x: (n, ...)`.

    Li et al.'s local-vs-distributed code test. Units are standardised with training-split
    statistics; each y unit is fitted with an independent L1-penalised linear map
    (`sklearn.linear_model.Lasso`, objective `‖y − Xw‖²/(2n) + α‖w‖₁`) for every penalty
    `α > 0`. A random `holdout` fraction of the examples (fixed by `seed`) is held out and the
    loss is measured there (on the training examples when no example is held out). Units of y
    constant on the training split are excluded (all constant: NaN). Returns
    `(len(l1_penalties),)` losses in standardised units (predicting 0 scores about 1).
    """
    shape_x, _ = _check_pair(x, y)
    penalties = np.asarray(l1_penalties, dtype=np.float64)
    if penalties.ndim != 1 or penalties.size == 0 or np.any(~(penalties > 0)):
        raise ValueError(f"l1_penalties must be a non-empty sequence of positive floats; got {l1_penalties!r}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout={holdout} must be in [0, 1)")
    n = shape_x[0]
    xa = np.asarray(x, dtype=np.float64).reshape(n, -1)
    ya = np.asarray(y, dtype=np.float64).reshape(n, -1)
    test = np.zeros(n, dtype=bool)
    test[np.random.default_rng(seed).permutation(n)[: round(holdout * n)]] = True
    train = ~test
    if train.sum() < 2:
        raise ValueError(f"holdout={holdout} leaves fewer than 2 training examples for x {shape_x}")
    ya = ya[:, ya[train].std(axis=0) > 0]
    if ya.shape[1] == 0:
        return np.full_like(penalties, np.nan)
    xs, ys = _standardise(xa, train), _standardise(ya, train)
    evaluate = test if test.any() else train
    model = Lasso(fit_intercept=False, warm_start=True, max_iter=10_000)
    losses = np.empty_like(penalties)
    for i in np.argsort(-penalties):
        model.set_params(alpha=penalties[i]).fit(xs[train], ys[train])
        prediction = model.predict(xs[evaluate]).reshape(-1, ys.shape[1])
        losses[i] = np.mean((prediction - ys[evaluate]) ** 2)
    return losses
