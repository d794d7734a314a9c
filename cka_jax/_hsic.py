"""Gram matrices, centering and HSIC estimators.

Inputs follow `cka_jax._checks` (representations `x: (n, ...)` of real numbers, grams
`(..., n, n)`); grams are built in the input's float dtype at full matmul precision, so TPU/GPU
results match CPU ones. Every function is checked on the host and then runs one compiled
program per input shape and dtype (also inside a caller's jit or vmap). Inputs are rescaled by
exact powers of two (`cka_jax._scaling`), and results with units are scaled back.

References: Gretton et al. 2005 (HSIC), Song et al. 2012 (unbiased HSIC), Kornblith et al.
2019 (CKA; the functions mirror their demo notebook).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from cka_jax._checks import (
    Array,
    check_flag,
    check_gram,
    check_gram_pair,
    check_input,
    check_threshold,
    float_matrix,
    to_float,
)
from cka_jax._scaling import HIGHEST, normalise, scaled_centred, times_pow2


@jax.jit
def _gram_linear(x: jax.Array) -> jax.Array:
    xc, k = scaled_centred(float_matrix(x))
    return times_pow2(jnp.matmul(xc, xc.T, precision=HIGHEST), 2 * k)


def gram_linear(x: Array) -> jax.Array:
    """Linear-kernel gram of the feature-centred representation, x: (n, ...) -> (n, n).

    Equals x xᵀ up to terms of the form a1ᵀ + 1aᵀ + c11ᵀ, which both centerings remove, so every
    HSIC and CKA value is unchanged; centering first avoids the float32 cancellation that large
    feature means would cause.

    Args:
        x: representation of n examples, (n, ...); trailing axes are flattened to p features.

    Returns:
        The (n, n) gram, in x's units squared: for entries of x beyond about 1e±19 in float32 it
        leaves float32's range (use `linear_cka` or `MinibatchCKA`, which are scale-proof).

    Raises:
        ValueError: x is not an array of at least 2 axes with n ≥ 1 examples, has a complex, string
            or object dtype, or holds float64 values float32 cannot hold without 64-bit mode.

    Example:
        >>> import numpy as np
        >>> from cka_jax import gram_linear
        >>> x = np.arange(6.0).reshape(3, 2)
        >>> np.asarray(gram_linear(x))
        array([[ 8.,  0., -8.],
               [ 0.,  0.,  0.],
               [-8.,  0.,  8.]], dtype=float32)
    """
    return _gram_linear(check_input(x, centre_axis=0))


def rbf_gram(x: jax.Array, threshold: jax.Array | float) -> jax.Array:
    """Traced RBF gram of a float x: (n, p) -> (n, n) (see `gram_rbf`), from exactly rescaled x."""
    x, _ = scaled_centred(x)
    dots = jnp.matmul(x, x.T, precision=HIGHEST)
    sq_norms = jnp.diagonal(dots)
    sq_dist = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * dots, 0)
    sq_dist = jnp.where(jnp.isfinite(dots), sq_dist, jnp.nan)
    bandwidth = 2 * threshold**2 * jnp.median(sq_dist)
    return jnp.exp(-sq_dist / bandwidth)


@jax.jit
def _gram_rbf(x: jax.Array, threshold: jax.Array) -> jax.Array:
    return rbf_gram(float_matrix(x), threshold)


def gram_rbf(x: Array, threshold: float = 1.0) -> jax.Array:
    """RBF gram exp(-d²/(2σ²)) with σ² = threshold² × median squared distance, x: (n, ...) -> (n, n).

    The median runs over all n² entries (diagonal included), as in Kornblith et al. 2019. The
    gram does not depend on x's scale, and is computed from exactly rescaled x.

    Args:
        x: representation of n examples, (n, ...); trailing axes are flattened.
        threshold: bandwidth as a multiple of the median distance; finite and > 0.

    Returns:
        The (n, n) gram, ones on the diagonal.

    Raises:
        ValueError: x is not a valid representation (see `gram_linear`) or threshold is not a
            finite number > 0.

    References:
        Kornblith, Norouzi, Lee & Hinton, *Similarity of Neural Network Representations Revisited*,
        ICML 2019.
    """
    check_threshold(threshold)
    return _gram_rbf(check_input(x, centre_axis=0, scale_lead=0), threshold)


def ucenter(gram: jax.Array, unbiased: bool) -> jax.Array:
    """`center_gram` without checks or rescaling, for grams already of moderate scale."""
    n = gram.shape[-1]
    if unbiased:
        diag = jnp.eye(n, dtype=bool)
        gram = jnp.where(diag, 0, gram)
        means = jnp.sum(gram, axis=-2) / (n - 2)
        means = means - jnp.sum(means, axis=-1, keepdims=True) / (2 * (n - 1))
        gram = gram - means[..., :, None] - means[..., None, :]
        return jnp.where(diag, 0, gram)
    means = jnp.mean(gram, axis=-2)
    means = means - jnp.mean(means, axis=-1, keepdims=True) / 2
    return gram - means[..., :, None] - means[..., None, :]


def _scaled_center(gram: jax.Array, unbiased: bool) -> tuple[jax.Array, jax.Array]:
    """Rescaled and centred float gram: (centred·2^-k, k), k of shape (..., 1, 1)."""
    gram, k = normalise(gram, axis=(-2, -1))
    return ucenter(gram, unbiased), k


def _check_unbiased_n(gram: Array, unbiased: bool, name: str) -> None:
    if unbiased and gram.shape[-1] < 4:
        raise ValueError(f"the unbiased estimator needs n >= 4 examples, got {name} of shape {tuple(gram.shape)}")


@partial(jax.jit, static_argnames="unbiased")
def _center_gram(gram: jax.Array, unbiased: bool) -> jax.Array:
    centred, k = _scaled_center(to_float(gram), unbiased)
    return times_pow2(centred, k)


def center_gram(gram: jax.Array, unbiased: bool = False) -> jax.Array:
    """Centres symmetric grams, gram: (..., n, n) -> (..., n, n).

    unbiased=False: H K H with H = I - 11ᵀ/n. unbiased=True: U-centering (zero diagonal, subtract
    row and column sums/(n-2), add total/((n-1)(n-2)), zero diagonal), so that
    <U(K), U(L)> / (n(n-3)) is the unbiased HSIC₁ of Song et al. 2012.

    Args:
        gram: symmetric grams, (..., n, n).
        unbiased: U-centering instead of H K H; needs n ≥ 4.

    Returns:
        The centred grams, same shape, in the gram's units.

    Raises:
        ValueError: the grams are not square and symmetric up to rounding, unbiased is not a bool,
            or unbiased=True with n < 4.

    References:
        Song, Smola, Gretton, Bedo & Borgwardt, *Feature Selection via Dependence Maximization*,
        JMLR 2012.

    Example:
        >>> import numpy as np
        >>> from cka_jax import center_gram
        >>> gram = np.random.default_rng(0).normal(size=(6, 3)) @ np.ones((3, 6))
        >>> centred = np.asarray(center_gram(gram + gram.T, unbiased=True))
        >>> bool(np.all(np.diag(centred) == 0)), bool(np.abs(centred.sum(axis=1)).max() < 1e-5)
        (True, True)
    """
    check_flag(unbiased, "unbiased")
    checked = check_gram(gram)
    _check_unbiased_n(checked, unbiased, "gram")
    return _center_gram(checked, bool(unbiased))


@partial(jax.jit, static_argnames="unbiased")
def _hsic(gram_x: jax.Array, gram_y: jax.Array, unbiased: bool) -> jax.Array:
    kc, kx = _scaled_center(to_float(gram_x), unbiased)
    lc, ky = _scaled_center(to_float(gram_y), unbiased)
    n = kc.shape[-1]
    norm = n * (n - 3) if unbiased else (n - 1) ** 2
    value = jnp.sum(kc * lc, axis=(-2, -1)) / norm
    return times_pow2(value, (kx + ky)[..., 0, 0])


def hsic(gram_x: jax.Array, gram_y: jax.Array, unbiased: bool = False) -> jax.Array:
    """HSIC between two (n, n) grams: biased HSIC₀ = tr(KHLH)/(n-1)², or unbiased HSIC₁.

    Bilinear in the grams: computed from exactly rescaled grams, the result is the float rounding
    of the exact value (inf or 0 only where that lies outside the dtype's range).

    Args:
        gram_x: symmetric gram K of one representation, (n, n).
        gram_y: symmetric gram L of the other, (n, n), over the same examples.
        unbiased: the unbiased estimator HSIC₁ (needs n ≥ 4) instead of HSIC₀.

    Returns:
        A scalar in the grams' units multiplied.

    Raises:
        ValueError: the grams differ in shape, are not square and symmetric up to rounding, or
            unbiased=True with n < 4.

    References:
        Gretton, Bousquet, Smola & Schölkopf, *Measuring Statistical Dependence with Hilbert-Schmidt
        Norms*, ALT 2005 (HSIC₀); Song et al., *Feature Selection via Dependence Maximization*,
        JMLR 2012 (HSIC₁).
    """
    check_flag(unbiased, "unbiased")
    checked_x, checked_y = check_gram_pair(gram_x, gram_y)
    _check_unbiased_n(checked_x, unbiased, "gram_x")
    return _hsic(checked_x, checked_y, bool(unbiased))
