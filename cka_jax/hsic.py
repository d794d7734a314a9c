"""Gram matrices, centering and HSIC estimators.

Conventions: a representation is `x: (n, ...)`, n examples by any feature shape; trailing
dims are flattened to `(n, p)`. Grams are built in float32 (float64 for float64 inputs, which
need `jax_enable_x64`) at full matmul precision, so TPU/GPU results match CPU ones.

References: Gretton et al. 2005 (HSIC), Song et al. 2012 (unbiased HSIC), Kornblith et al.
2019 (CKA; the functions mirror their demo notebook).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def as_matrix(x: jax.Array, name: str = "x") -> jax.Array:
    """x: (n, ...) -> (n, p) in a float dtype of at least 32 bits."""
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
                f"{name} must have shape (n, ...) with at least one feature axis, got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def center_features(x: jax.Array) -> jax.Array:
    """x: (..., n, p) -> x minus its mean over the n examples.

    The first example is subtracted before the mean, so constant features become exact zeros.
    The mean is a matmul with a ones vector: XLA:CPU reduces over the example axis several times
    slower than it multiplies.
    """
    x = x - x[..., :1, :]
    weights = jnp.full((1, x.shape[-2]), 1.0 / x.shape[-2], x.dtype)
    return x - jnp.matmul(weights, x, precision=HIGHEST)


def gram_linear(x: jax.Array) -> jax.Array:
    """Linear-kernel gram of the feature-centred representation, x: (n, ...) -> (n, n).

    Equals x xᵀ up to terms of the form a1ᵀ + 1aᵀ + c11ᵀ, which both centerings remove, so every
    HSIC and CKA value is unchanged; centering first avoids the float32 cancellation that large
    feature means would cause.
    """
    x = center_features(as_matrix(x))
    return jnp.matmul(x, x.T, precision=HIGHEST)


def gram_rbf(x: jax.Array, threshold: float = 1.0) -> jax.Array:
    """RBF gram exp(-d²/(2σ²)) with σ² = threshold² × median squared distance, x: (n, ...) -> (n, n).

    The median runs over all n² entries (diagonal included), as in Kornblith et al. 2019.
    """
    x = center_features(as_matrix(x))
    dots = jnp.matmul(x, x.T, precision=HIGHEST)
    sq_norms = jnp.diagonal(dots)
    sq_dist = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * dots, 0)
    sq_dist = jnp.where(jnp.isfinite(dots), sq_dist, jnp.nan)
    bandwidth = 2 * threshold**2 * jnp.median(sq_dist)
    return jnp.exp(-sq_dist / bandwidth)


def center_gram(gram: jax.Array, unbiased: bool = False) -> jax.Array:
    """Centres symmetric grams, gram: (..., n, n) -> (..., n, n).

    unbiased=False: H K H with H = I - 11ᵀ/n. unbiased=True: U-centering (zero diagonal, subtract
    row and column sums/(n-2), add total/((n-1)(n-2)), zero diagonal), so that
    <U(K), U(L)> / (n(n-3)) is the unbiased HSIC₁ of Song et al. 2012.
    """
    gram = jnp.asarray(gram)
    n = gram.shape[-1]
    if gram.ndim < 2 or gram.shape[-2] != n:
        raise ValueError(f"gram must be square, (..., n, n), got shape {gram.shape}")
    if unbiased:
        if n < 4:
            raise ValueError(f"the unbiased estimator needs n >= 4 examples, got a gram of shape {gram.shape}")
        diag = jnp.eye(n, dtype=bool)
        gram = jnp.where(diag, 0, gram)
        means = jnp.sum(gram, axis=-2) / (n - 2)
        means = means - jnp.sum(means, axis=-1, keepdims=True) / (2 * (n - 1))
        gram = gram - means[..., :, None] - means[..., None, :]
        return jnp.where(diag, 0, gram)
    means = jnp.mean(gram, axis=-2)
    means = means - jnp.mean(means, axis=-1, keepdims=True) / 2
    return gram - means[..., :, None] - means[..., None, :]


def hsic(gram_x: jax.Array, gram_y: jax.Array, unbiased: bool = False) -> jax.Array:
    """HSIC between two (n, n) grams: biased HSIC₀ = tr(KHLH)/(n-1)², or unbiased HSIC₁."""
    n = gram_x.shape[-1]
    if gram_x.shape != gram_y.shape:
        raise ValueError(f"grams must have the same shape, got {gram_x.shape} and {gram_y.shape}")
    kc = center_gram(gram_x, unbiased)
    lc = center_gram(gram_y, unbiased)
    norm = n * (n - 3) if unbiased else (n - 1) ** 2
    return jnp.sum(kc * lc, axis=(-2, -1)) / norm
