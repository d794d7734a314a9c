"""Centered kernel alignment on whole representations (Kornblith et al. 2019).

CKA is undefined for a constant (zero-variance) representation: its centred gram is zero and the
result is NaN, never 0, 1 or inf. NaN or inf in the inputs gives NaN. CKA does not depend on the
scale of either input, and neither does its computation: inputs are rescaled by exact powers of
two before any product, so float32 gives the same value for activations of scale 1e-30 or 1e30.
Each function checks its inputs on the host, then runs one compiled program per input shape.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from cka_jax._checks import (
    check_flag,
    check_gram_pair,
    check_pair,
    check_symmetric,
    check_threshold,
    float_matrix,
    to_float,
)
from cka_jax._hsic import rbf_gram, ucenter
from cka_jax._scaling import HIGHEST, normalise, scaled_centred


def _centred_unit(gram: jax.Array, debiased: bool) -> jax.Array:
    """Centred gram with its largest entry brought near 1: CKA is scale invariant, and the exact
    power-of-two rescaling before and after centering keeps products from under/overflowing."""
    gram, _ = normalise(gram)
    return normalise(ucenter(gram, debiased))[0]


def _gram_cka(gram_x: jax.Array, gram_y: jax.Array, debiased: bool) -> jax.Array:
    """CKA of two float (n, n) grams -> scalar."""
    kc = _centred_unit(gram_x, debiased)
    lc = _centred_unit(gram_y, debiased)
    return jnp.vdot(kc, lc) / (jnp.linalg.norm(kc) * jnp.linalg.norm(lc))


@partial(jax.jit, static_argnames="debiased")
def _cka(gram_x: jax.Array, gram_y: jax.Array, debiased: bool) -> jax.Array:
    return _gram_cka(to_float(gram_x), to_float(gram_y), debiased)


def _check_min_examples(n: int, debiased: bool, what: str) -> None:
    min_n = 4 if debiased else 2
    if n < min_n:
        raise ValueError(f"{'debiased' if debiased else 'biased'} CKA needs n >= {min_n} examples, got {what}")


def cka(gram_x: jax.Array, gram_y: jax.Array, debiased: bool = False) -> jax.Array:
    """CKA between two symmetric grams, (n, n) each -> scalar.

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)). CKA does not depend on either gram's
    scale, so any finite scale is fine.

    Args:
        gram_x: symmetric gram of one representation, (n, n), e.g. from `gram_linear`.
        gram_y: symmetric gram of the other, (n, n), over the same examples.
        debiased: use U-centering, i.e. the ratio of unbiased HSIC₁ estimates (needs n ≥ 4).

    Returns:
        A scalar in [0, 1] (debiased values can fall slightly below 0); NaN when a gram is
        constant after centering (CKA is undefined) or holds NaN or inf.

    Raises:
        ValueError: the grams are not (n, n), differ in shape, are not symmetric up to rounding (a
            kernel gives k(x_i, x_j) = k(x_j, x_i)), or debiased=True with n < 4.

    References:
        Kornblith, Norouzi, Lee & Hinton, *Similarity of Neural Network Representations Revisited*,
        ICML 2019.

    Example:
        >>> import numpy as np
        >>> from cka_jax import cka, gram_linear
        >>> x = np.random.default_rng(0).normal(size=(50, 8))
        >>> round(float(cka(gram_linear(x), gram_linear(3 * x))), 4)
        1.0
    """
    check_flag(debiased, "debiased")
    checked_x, checked_y = check_gram_pair(gram_x, gram_y, scale_free=True)
    if checked_x.ndim != 2:
        raise ValueError(f"cka takes two (n, n) grams, got shape {tuple(checked_x.shape)}")
    check_symmetric(checked_x, "gram_x")
    check_symmetric(checked_y, "gram_y")
    if debiased:
        _check_min_examples(checked_x.shape[-1], debiased, f"grams of shape {tuple(checked_x.shape)}")
    return _cka(checked_x, checked_y, bool(debiased))


def _debiased_dot(
    xty_sq: jax.Array, rows_x: jax.Array, rows_y: jax.Array, norm_x: jax.Array, norm_y: jax.Array, n: int
) -> jax.Array:
    """<U(K), U(L)> for linear grams of centred features, from feature-space statistics."""
    return xty_sq - n / (n - 2) * jnp.dot(rows_x, rows_y) + norm_x * norm_y / ((n - 1) * (n - 2))


def _feature_space_linear_cka(x: jax.Array, y: jax.Array, debiased: bool) -> jax.Array:
    """x, y centred with max |entry| in [2, 4): every product below stays far inside float32."""
    n = x.shape[0]
    xty = jnp.sum(jnp.square(jnp.matmul(x.T, y, precision=HIGHEST)))
    xtx = jnp.sum(jnp.square(jnp.matmul(x.T, x, precision=HIGHEST)))
    yty = jnp.sum(jnp.square(jnp.matmul(y.T, y, precision=HIGHEST)))
    if not debiased:
        return xty / (jnp.sqrt(xtx) * jnp.sqrt(yty))
    rows_x, rows_y = jnp.sum(x * x, axis=1), jnp.sum(y * y, axis=1)
    norm_x, norm_y = jnp.sum(rows_x), jnp.sum(rows_y)
    return _debiased_dot(xty, rows_x, rows_y, norm_x, norm_y, n) / (
        jnp.sqrt(_debiased_dot(xtx, rows_x, rows_x, norm_x, norm_x, n))
        * jnp.sqrt(_debiased_dot(yty, rows_y, rows_y, norm_y, norm_y, n))
    )


@partial(jax.jit, static_argnames="debiased")
def _linear_cka(x: jax.Array, y: jax.Array, debiased: bool) -> jax.Array:
    (x, _), (y, _) = scaled_centred(float_matrix(x)), scaled_centred(float_matrix(y))
    n, p = x.shape
    q = y.shape[1]
    if p * p + p * q + q * q < n * (p + q):
        return _feature_space_linear_cka(x, y, debiased)
    return _gram_cka(jnp.matmul(x, x.T, precision=HIGHEST), jnp.matmul(y, y.T, precision=HIGHEST), debiased)


def linear_cka(x: jax.Array, y: jax.Array, debiased: bool = False) -> jax.Array:
    """Linear CKA, x: (n, ...), y: (n, ...) -> scalar.

    Uses the feature-space form ‖yᵀx‖²_F / (‖xᵀx‖_F ‖yᵀy‖_F) (no n×n gram) when n·(p² + pq + q²)
    is below the gram cost n²·(p + q), and the gram form otherwise; both give the same value.
    Invariant to orthogonal transformations and isotropic scaling of either input.

    Args:
        x: representation of n examples, (n, ...); trailing axes are flattened to p features.
        y: representation of the same n examples, (n, ...), q features.
        debiased: the ratio of unbiased HSIC₁ estimates (needs n ≥ 4) instead of HSIC₀.

    Returns:
        A scalar in [0, 1]; NaN when either representation is constant (CKA is undefined) or holds
        NaN or inf.

    Raises:
        ValueError: x or y is not an array of at least 2 axes, their example counts differ, n < 2
            (n < 4 with debiased=True), or a dtype is not numeric.

    References:
        Kornblith, Norouzi, Lee & Hinton, *Similarity of Neural Network Representations Revisited*,
        ICML 2019.

    Example:
        >>> import numpy as np
        >>> from cka_jax import linear_cka
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(100, 16))
        >>> rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
        >>> round(float(linear_cka(x, 5 * x @ rotation)), 4)
        1.0
    """
    check_flag(debiased, "debiased")
    xc, yc = check_pair(x, y)
    _check_min_examples(xc.shape[0], debiased, str(xc.shape[0]))
    return _linear_cka(xc, yc, bool(debiased))


@partial(jax.jit, static_argnames="debiased")
def _rbf_cka(x: jax.Array, y: jax.Array, threshold: jax.Array, debiased: bool) -> jax.Array:
    return _gram_cka(rbf_gram(float_matrix(x), threshold), rbf_gram(float_matrix(y), threshold), debiased)


def rbf_cka(x: jax.Array, y: jax.Array, threshold: float = 1.0, debiased: bool = False) -> jax.Array:
    """CKA with RBF kernels, x: (n, ...), y: (n, ...) -> scalar.

    Each gram is `gram_rbf` of its representation, with the bandwidth from its own median distance.

    Args:
        x: representation of n examples, (n, ...); trailing axes are flattened.
        y: representation of the same n examples, (n, ...).
        threshold: bandwidth as a multiple of the median distance; finite and > 0.
        debiased: the ratio of unbiased HSIC₁ estimates (needs n ≥ 4) instead of HSIC₀.

    Returns:
        A scalar in [0, 1]; NaN when either representation is constant or holds NaN or inf.

    Raises:
        ValueError: as `linear_cka`, or threshold is not a finite number > 0.

    References:
        Kornblith, Norouzi, Lee & Hinton, *Similarity of Neural Network Representations Revisited*,
        ICML 2019.
    """
    check_threshold(threshold)
    check_flag(debiased, "debiased")
    xc, yc = check_pair(x, y)
    _check_min_examples(xc.shape[0], debiased, str(xc.shape[0]))
    return _rbf_cka(xc, yc, threshold, bool(debiased))
