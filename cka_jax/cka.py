"""Centered kernel alignment on whole representations (Kornblith et al. 2019).

CKA is undefined for a constant (zero-variance) representation: its centred gram is zero and the
result is NaN, never 0, 1 or inf. NaN or inf in the inputs gives NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cka_jax.hsic import HIGHEST, as_matrix, center_features, center_gram, gram_rbf


def cka(gram_x: jax.Array, gram_y: jax.Array, debiased: bool = False) -> jax.Array:
    """CKA between two symmetric grams, (n, n) each -> scalar.

    debiased=True uses U-centering, i.e. the ratio of unbiased HSIC₁ estimates.
    """
    if gram_x.shape != gram_y.shape:
        raise ValueError(f"grams must have the same shape, got {gram_x.shape} and {gram_y.shape}")
    kc = _unit_scale(center_gram(gram_x, unbiased=debiased))
    lc = _unit_scale(center_gram(gram_y, unbiased=debiased))
    return jnp.vdot(kc, lc) / (jnp.linalg.norm(kc) * jnp.linalg.norm(lc))


def _unit_scale(a: jax.Array) -> jax.Array:
    """a / max|a|: CKA is scale invariant, and this keeps tiny or huge values from under/overflowing."""
    return a / jnp.max(jnp.abs(a))


def _pair(x: jax.Array, y: jax.Array, debiased: bool) -> tuple[jax.Array, jax.Array]:
    x, y = as_matrix(x, "x"), as_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of examples, got shapes {x.shape} and {y.shape}")
    min_n = 4 if debiased else 2
    if x.shape[0] < min_n:
        raise ValueError(f"{'debiased' if debiased else 'biased'} CKA needs n >= {min_n} examples, got {x.shape[0]}")
    return x, y


def _debiased_dot(xty_sq, rows_x, rows_y, norm_x, norm_y, n):
    """<U(K), U(L)> for linear grams of centred features, from feature-space statistics."""
    return xty_sq - n / (n - 2) * jnp.dot(rows_x, rows_y) + norm_x * norm_y / ((n - 1) * (n - 2))


def _feature_space_linear_cka(x: jax.Array, y: jax.Array, debiased: bool) -> jax.Array:
    n = x.shape[0]
    xty = jnp.sum(jnp.square(jnp.matmul(x.T, y, precision=HIGHEST)))
    xtx = jnp.sum(jnp.square(jnp.matmul(x.T, x, precision=HIGHEST)))
    yty = jnp.sum(jnp.square(jnp.matmul(y.T, y, precision=HIGHEST)))
    if not debiased:
        return xty / jnp.sqrt(xtx * yty)
    rows_x, rows_y = jnp.sum(x * x, axis=1), jnp.sum(y * y, axis=1)
    norm_x, norm_y = jnp.sum(rows_x), jnp.sum(rows_y)
    return _debiased_dot(xty, rows_x, rows_y, norm_x, norm_y, n) / jnp.sqrt(
        _debiased_dot(xtx, rows_x, rows_x, norm_x, norm_x, n)
        * _debiased_dot(yty, rows_y, rows_y, norm_y, norm_y, n))


def linear_cka(x: jax.Array, y: jax.Array, debiased: bool = False) -> jax.Array:
    """Linear CKA, x: (n, ...), y: (n, ...) -> scalar.

    Uses the feature-space form ‖yᵀx‖²_F / (‖xᵀx‖_F ‖yᵀy‖_F) (no n×n gram) when n·(p² + pq + q²)
    is below the gram cost n²·(p + q), and the gram form otherwise; both give the same value.
    """
    x, y = _pair(x, y, debiased)
    x, y = _unit_scale(center_features(x)), _unit_scale(center_features(y))
    n, p = x.shape
    q = y.shape[1]
    if p * p + p * q + q * q < n * (p + q):
        return _feature_space_linear_cka(x, y, debiased)
    return cka(jnp.matmul(x, x.T, precision=HIGHEST), jnp.matmul(y, y.T, precision=HIGHEST), debiased)


def rbf_cka(x: jax.Array, y: jax.Array, threshold: float = 1.0, debiased: bool = False) -> jax.Array:
    """CKA with RBF kernels (bandwidth from the median distance, see `gram_rbf`) -> scalar."""
    x, y = _pair(x, y, debiased)
    return cka(gram_rbf(x, threshold), gram_rbf(y, threshold), debiased)
