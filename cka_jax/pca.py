"""First principal component of a layer representation (the paper's Fig. 3 / D.5).

Representations are `x: (n, ...)`, examples first; trailing dims are flattened to `p`
features and features are centred over the examples. Each function eigendecomposes the
cheaper of the `n×n` gram matrix and the `p×p` covariance (`jnp.linalg.eigh`), so shapes
stay static and everything is jit-compatible. A constant representation (zero variance) has
no first principal component: every result is NaN.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cka_jax.hsic import HIGHEST, as_matrix, center_features


def _centred(x: jax.Array) -> jax.Array:
    """`x: (n, ...)` -> feature-centred `(n, p)` in its float dtype."""
    return center_features(as_matrix(x))


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


@jax.jit
def _first_pc_summary(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Variance fraction, scores `(n,)` and direction `(p,)` of the first PC of `x: (n, ...)`."""
    xc = _centred(x)
    lam1, u, v = _first_pc(xc)
    return lam1 / jnp.sum(xc**2), u, v


def first_pc_variance_fraction(x: jax.Array) -> jax.Array:
    """Fraction of the total variance of `x: (n, ...)` explained by its first PC: scalar in [0, 1]."""
    return _first_pc_summary(x)[0]


def first_pc_scores(x: jax.Array) -> jax.Array:
    """Unit-norm per-example coordinates of the first PC of `x: (n, ...)`: `(n,)`.

    The first left singular vector of the centred representation; it lives in example space,
    so it is comparable across layers of different widths. Sign: its largest-magnitude entry
    is positive.
    """
    return _first_pc_summary(x)[1]


def first_pc_direction(x: jax.Array) -> jax.Array:
    """Unit-norm first principal direction of `x: (n, ...)` in flattened feature space: `(p,)`.

    Sign matches `first_pc_scores`: centred `x @ direction` is a positive multiple of the scores.
    """
    return _first_pc_summary(x)[2]


@jax.jit
def remove_first_pc(x: jax.Array) -> jax.Array:
    """Centred `x: (n, ...)` with its first PC projected out, same shape as `x`."""
    xc = _centred(x)
    _, u, _ = _first_pc(xc)
    return (xc - jnp.outer(u, jnp.matmul(u, xc, precision=HIGHEST))).reshape(x.shape)


def first_pc_cosine_similarity(xs: Sequence[jax.Array]) -> jax.Array:
    """|cos| between the first-PC score vectors of layers `xs[i]: (n, ...)`: `(L, L)`.

    All layers must share the same `n` examples (in the same order).
    """
    if not xs:
        raise ValueError("need at least one representation")
    shapes = [jnp.shape(x) for x in xs]
    if any(len(s) < 2 for s in shapes) or len({s[0] for s in shapes}) != 1:
        raise ValueError(f"representations must be (n, ...) with the same n; got shapes {shapes}")
    scores = jnp.stack([first_pc_scores(x) for x in xs])
    return jnp.abs(jnp.matmul(scores, scores.T, precision=HIGHEST))
