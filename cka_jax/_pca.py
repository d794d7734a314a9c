"""First principal component of a layer representation (the paper's Fig. 3 / D.5).

Representations are `x: (n, ...)`, examples first; trailing dims are flattened to `p`
features and features are centred over the examples. Each function eigendecomposes the
cheaper of the `n×n` gram matrix and the `p×p` covariance (`jnp.linalg.eigh`), so shapes
stay static and everything is jit-compatible. A constant representation (zero variance) has
no first principal component: every result is NaN; so does NaN or inf in the input. The input is
first rescaled by an exact power of two, so no result depends on its scale (`remove_first_pc`
returns the input's units). Each function checks its input on the host, then runs one compiled
program per input shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cka_jax._checks import all_finite, check_input, float_matrix, nan_unless
from cka_jax._scaling import HIGHEST, scaled_centred, times_pow2


def _first_pc(xc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top eigenvalue λ₁ = s₁² and unit singular vectors u: (n,), v: (p,) of centred `xc: (n, p)`.

    Sign convention: the entry of `u` with the largest magnitude is positive; `xc v = s₁ u`.
    Without variance `xc = 0`, and normalising the zero vector makes `u` and `v` NaN.
    """
    n, p = xc.shape
    if n <= p:
        lam, vecs = jnp.linalg.eigh(jnp.matmul(xc, xc.T, precision=HIGHEST))
        v = jnp.matmul(xc.T, vecs[:, -1], precision=HIGHEST)
    else:
        lam, vecs = jnp.linalg.eigh(jnp.matmul(xc.T, xc, precision=HIGHEST))
        v = vecs[:, -1]
    v = v / jnp.linalg.norm(v)
    u = jnp.matmul(xc, v, precision=HIGHEST)
    u = u / jnp.linalg.norm(u)
    sign = jnp.sign(u[jnp.argmax(jnp.abs(u))])
    return lam[-1], sign * u, sign * v


def _first_pc_summary(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Variance fraction, scores `(n,)` and direction `(p,)` of the first PC of checked `x: (n, ...)`."""
    xc, _ = scaled_centred(float_matrix(x))
    lam1, u, v = _first_pc(xc)
    finite = all_finite(xc)
    return nan_unless(finite, lam1 / jnp.sum(xc**2)), nan_unless(finite, u), nan_unless(finite, v)


_variance_fraction = jax.jit(lambda x: _first_pc_summary(x)[0])
_scores = jax.jit(lambda x: _first_pc_summary(x)[1])
_direction = jax.jit(lambda x: _first_pc_summary(x)[2])


def first_pc_variance_fraction(x: jax.Array) -> jax.Array:
    """Fraction of the total variance of `x: (n, ...)` explained by its first PC: scalar in [0, 1].

    Args:
        x: representation of n examples, (n, ...); trailing axes are flattened.

    Returns:
        A scalar in [0, 1]; NaN for a constant representation or NaN or inf input.

    Raises:
        ValueError: x is not an array of at least 2 axes with a numeric dtype.

    References:
        Nguyen, Raghu & Kornblith, *Do Wide and Deep Networks Learn the Same Things? Uncovering How
        Neural Network Representations Vary with Width and Depth*, ICLR 2021 (Fig. 3).

    Example:
        >>> import numpy as np
        >>> from cka_jax import first_pc_variance_fraction
        >>> x = np.random.default_rng(0).normal(size=(100, 4)) * [10.0, 1.0, 1.0, 1.0]
        >>> 0.9 < float(first_pc_variance_fraction(x)) < 1.0
        True
    """
    return _variance_fraction(check_input(x, centre_axis=0, scale_lead=0))


def first_pc_scores(x: jax.Array) -> jax.Array:
    """Unit-norm per-example coordinates of the first PC of `x: (n, ...)`: `(n,)`.

    The first left singular vector of the centred representation; it lives in example space,
    so it is comparable across layers of different widths.

    Args:
        x: representation of n examples, (n, ...).

    Returns:
        The (n,) unit-norm scores; sign: the largest-magnitude entry is positive. NaN for a
        constant representation or NaN or inf input.

    Raises:
        ValueError: x is not an array of at least 2 axes with a numeric dtype.
    """
    return _scores(check_input(x, centre_axis=0, scale_lead=0))


def first_pc_direction(x: jax.Array) -> jax.Array:
    """Unit-norm first principal direction of `x: (n, ...)` in flattened feature space: `(p,)`.

    Args:
        x: representation of n examples, (n, ...), p features after flattening.

    Returns:
        The (p,) unit-norm direction; its sign matches `first_pc_scores` (centred `x @ direction`
        is a positive multiple of the scores). NaN for a constant representation or NaN or inf input.

    Raises:
        ValueError: x is not an array of at least 2 axes with a numeric dtype.
    """
    return _direction(check_input(x, centre_axis=0, scale_lead=0))


@jax.jit
def _remove_first_pc(x: jax.Array) -> jax.Array:
    """Centred checked `x: (n, ...)` with its first PC projected out, same shape and in x's units."""
    xc, k = scaled_centred(float_matrix(x))
    _, u, _ = _first_pc(xc)
    removed = times_pow2(xc - jnp.outer(u, jnp.matmul(u, xc, precision=HIGHEST)), k)
    return nan_unless(all_finite(xc), removed).reshape(x.shape)


def remove_first_pc(x: jax.Array) -> jax.Array:
    """Centred `x: (n, ...)` with its first PC projected out: same shape as `x`.

    Args:
        x: representation of n examples, (n, ...).

    Returns:
        The centred representation minus its first-PC component, in x's units (equivariant:
        remove_first_pc(c·x) = c·remove_first_pc(x)); NaN for a constant representation or NaN or
        inf input.

    Raises:
        ValueError: x is not an array of at least 2 axes with a numeric dtype.
    """
    return _remove_first_pc(check_input(x, centre_axis=0))


def first_pc_cosine_similarity(xs: Sequence[jax.Array]) -> jax.Array:
    """Absolute cosine between the first-PC score vectors of layers `xs[i]: (n, ...)`: `(L, L)`.

    Args:
        xs: a list or tuple of L arrays, one per layer; all share the same n examples (in the
            same order).

    Returns:
        The (L, L) symmetric matrix of abs(cos) in [0, 1], ones on the diagonal of defined layers;
        NaN in the rows and columns of a constant layer or one with NaN or inf.

    Raises:
        ValueError: xs is empty, not a list or tuple, or its arrays differ in n or are not valid
            representations.
    """
    if not isinstance(xs, (list, tuple)) or not xs:
        got = f"an empty {type(xs).__name__}" if isinstance(xs, (list, tuple)) else f"a {type(xs).__name__}"
        raise ValueError(f"xs must be a list of at least one (n, ...) array, one per layer; got {got}")
    checked = [check_input(x, f"xs[{i}]", centre_axis=0, scale_lead=0) for i, x in enumerate(xs)]
    if len({x.shape[0] for x in checked}) != 1:
        raise ValueError(f"representations must be (n, ...) with the same n; got shapes {[jnp.shape(x) for x in xs]}")
    return _cosine_similarity(checked)


@jax.jit
def _cosine_similarity(xs: list[jax.Array]) -> jax.Array:
    """|cos| of the first-PC scores of checked layers xs[i]: (n, ...) -> (L, L)."""
    scores = jnp.stack([_first_pc_summary(x)[1] for x in xs])
    return jnp.abs(jnp.matmul(scores, scores.T, precision=HIGHEST))
