"""Convergent learning (Li et al. 2016): unit matching and sparse prediction across networks.

Representations are `x: (n, ...)`, `y: (n, ...)` with the same `n` examples first; trailing
dims are flattened to `p` and `q` units. A unit with zero variance (e.g. a dead ReLU) has an
undefined (NaN) correlation with every unit; matchings never pair a unit with it when a real
unit is available, and pairs whose correlation is NaN are left out of the result. NaN or inf
in the data is different: a damaged unit's correlations are NaN, and a matching or sparse
prediction loss from damaged data is NaN as a whole (a matching keeps its pairs, each with a NaN
correlation), never a shorter list of finite values. Each unit is rescaled by an exact power of
two before its correlations, so they do not depend on any unit's scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from cka_jax._checks import all_finite, check_count, check_pair, float_matrix, host_matrix, is_real
from cka_jax._scaling import HIGHEST, scaled_centred

MATCHING_METHODS = ("bipartite", "semi")


class UnitMatching(NamedTuple):
    """Matched unit pairs, ordered by x unit.

    Attributes:
        x_units: (m,) int indices into x's units.
        y_units: (m,) int indices into y's units.
        correlations: (m,) float Pearson correlation of each pair.
    """

    x_units: np.ndarray
    y_units: np.ndarray
    correlations: np.ndarray


def _correlations(x: jax.Array, y: jax.Array) -> jax.Array:
    """Pearson correlations of the units of checked x: (n, ...) and y: (n, ...) -> (p, q), each
    unit rescaled exactly."""
    (xc, _), (yc, _) = scaled_centred(float_matrix(x), axis=0), scaled_centred(float_matrix(y), axis=0)
    xs = xc / jnp.linalg.norm(xc, axis=0)
    ys = yc / jnp.linalg.norm(yc, axis=0)
    return jnp.clip(jnp.matmul(xs.T, ys, precision=HIGHEST), -1.0, 1.0)


_unit_correlations = jax.jit(_correlations)


@jax.jit
def _correlations_and_finite(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`_correlations` and whether x and y hold no NaN or inf."""
    return _correlations(x, y), all_finite(x, y)


def unit_correlations(x: jax.Array, y: jax.Array) -> jax.Array:
    """Pearson correlations between units of `x: (n, ...)` and `y: (n, ...)`: `(p, q)`.

    Args:
        x: representation of n examples, (n, ...); trailing axes are flattened to p units.
        y: representation of the same n examples, (n, ...), q units.

    Returns:
        The (p, q) correlations; entries involving a zero-variance unit, or a unit with NaN or inf,
        are NaN.

    Raises:
        ValueError: x or y is not a valid representation or their example counts differ.
    """
    return _unit_correlations(*check_pair(x, y))


def match_units(x: jax.Array, y: jax.Array, method: str = "bipartite") -> UnitMatching:
    """Match units of `x: (n, ...)` to units of `y: (n, ...)` by correlation.

    Pairs with NaN correlation are dropped, unless x or y holds NaN or inf: then every pair's
    correlation is NaN.

    Args:
        x: representation of n examples, (n, ...); trailing axes are flattened to p units.
        y: representation of the same n examples, (n, ...), q units.
        method: "bipartite": one-to-one assignment of min(p, q) pairs maximising the total
            correlation (`scipy.optimize.linear_sum_assignment`), first maximising the number of
            pairs with a defined correlation. "semi": each unit of x to its best-correlated unit of
            y (several x units may share a y unit).

    Returns:
        A `UnitMatching` of the matched pairs, ordered by x unit.

    Raises:
        ValueError: method is not "bipartite" or "semi", or x, y are not valid representations.

    References:
        Li, Yosinski, Clune, Lipson & Hopcroft, *Convergent Learning: Do different neural networks
        learn the same representations?*, ICLR 2016.

    Example:
        >>> import numpy as np
        >>> from cka_jax import match_units
        >>> x = np.random.default_rng(0).normal(size=(100, 3))
        >>> matching = match_units(x, x[:, [2, 0, 1]])
        >>> matching.y_units.tolist()
        [1, 2, 0]
    """
    if method not in MATCHING_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {MATCHING_METHODS}")
    corr, finite = _correlations_and_finite(*check_pair(x, y))
    corr = np.asarray(corr, dtype=np.float64)
    defined = np.isfinite(corr)
    if method == "bipartite":
        # With m = min(p, q) pairs, any assignment using a NaN pair (scored -2m) totals at most
        # -2m + (m - 1) < -m, below every assignment of real pairs.
        score = np.where(defined, corr, -2.0 * min(corr.shape))
        rows, cols = linear_sum_assignment(score, maximize=True)
    else:
        rows = np.arange(corr.shape[0])
        cols = np.argmax(np.where(defined, corr, -np.inf), axis=1)
    if not finite:
        return UnitMatching(rows, cols, np.full(len(rows), np.nan))
    keep = defined[rows, cols]
    return UnitMatching(rows[keep], cols[keep], corr[rows, cols][keep])


def _unit_scale(a: np.ndarray) -> np.ndarray:
    """a·2^-e with its largest |entry| in [0.5, 1) (exact), so variances cannot under/overflow."""
    largest = np.max(np.abs(a))
    return np.ldexp(a, -np.frexp(largest)[1]) if largest > 0 else a


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
    `α > 0`. Units of y constant on the training split are excluded.

    Args:
        x: representation of n examples, (n, ...), the predictors.
        y: representation of the same n examples, (n, ...), the units predicted.
        l1_penalties: the penalties α, each finite and > 0.
        holdout: the fraction of examples held out (fixed by `seed`) on which the loss is
            measured, in [0, 1); with no example held out, the training examples are used.
        seed: seed of the held-out split.

    Returns:
        A NumPy array `(len(l1_penalties),)` of losses in standardised units (predicting 0 scores
        about 1); NaN when every unit of y is constant, or for NaN or inf in x or y.

    Raises:
        ValueError: invalid representations, an empty or non-positive penalty list, or holdout
            outside [0, 1) or leaving too few training examples.

    References:
        Li, Yosinski, Clune, Lipson & Hopcroft, *Convergent Learning: Do different neural networks
        learn the same representations?*, ICLR 2016.
    """
    xa, ya = (host_matrix(a) for a in check_pair(x, y, own=False))
    try:
        penalties = np.asarray(l1_penalties, dtype=np.float64)
    except (TypeError, ValueError):
        penalties = np.empty(0)
    if penalties.ndim != 1 or penalties.size == 0 or not np.all((penalties > 0) & np.isfinite(penalties)):
        raise ValueError(f"l1_penalties must be a non-empty sequence of positive finite floats; got {l1_penalties!r}")
    if not (is_real(holdout) and 0.0 <= holdout < 1.0):
        raise ValueError(f"holdout={holdout!r} must be a number in [0, 1)")
    check_count(seed, "seed", None)
    shape_x, n = np.shape(x), xa.shape[0]
    test = np.zeros(n, dtype=bool)
    test[np.random.default_rng(seed).permutation(n)[: round(holdout * n)]] = True
    train = ~test
    if train.sum() < 2:
        raise ValueError(f"holdout={holdout} leaves fewer than 2 training examples for x {shape_x}")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        return np.full_like(penalties, np.nan)
    xa, ya = _unit_scale(xa), _unit_scale(ya)
    ya = ya[:, ya[train].std(axis=0) > 0]
    if ya.shape[1] == 0:
        return np.full_like(penalties, np.nan)
    xs, ys = _standardise(xa, train), _standardise(ya, train)
    evaluate = test if test.any() else train
    # Imported here, not at the top: `import cka_jax` loads only jax, numpy and scipy, not scikit-learn.
    from sklearn.linear_model import Lasso

    model = Lasso(fit_intercept=False, warm_start=True, max_iter=10_000)
    losses = np.empty_like(penalties)
    for i in np.argsort(-penalties):
        model.set_params(alpha=penalties[i]).fit(xs[train], ys[train])
        prediction = model.predict(xs[evaluate]).reshape(-1, ys.shape[1])
        losses[i] = np.mean((prediction - ys[evaluate]) ** 2)
    return losses
