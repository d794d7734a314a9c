"""Input checks, exact power-of-two scaling, Gram matrices, centering and HSIC estimators.

Conventions: a representation is `x: (n, ...)`, n examples by any feature shape; trailing
dims are flattened to `(n, p)`. Inputs must be arrays (NumPy or JAX; Python lists are refused,
as JAX does) of real numbers: bool, integer and 16-bit float inputs are upcast to float32,
float64 stays float64 with `jax_enable_x64`; complex, string and object arrays raise
`ValueError`. Grams are built in that float dtype at full matmul precision, so TPU/GPU results
match CPU ones.

Scale: every function first multiplies its input by a power of two (exact in floating point)
that brings its largest magnitude near 1, and undoes it on the way out where the result has
units (grams, HSIC, centred grams). So CKA-type ratios never under- or overflow for finite
inputs, and values with units are the float rounding of the exact result (inf or 0 only where
that result itself lies outside the dtype's range).

References: Gretton et al. 2005 (HSIC), Song et al. 2012 (unbiased HSIC), Kornblith et al.
2019 (CKA; the functions mirror their demo notebook).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def float_dtype(dtype, name: str = "x") -> np.dtype:
    """The float dtype a real `dtype` is computed in; ValueError naming `name` for any other dtype.

    bool, integers and floats narrower than 32 bits -> float32; float64 -> float64 when
    `jax_enable_x64` is on (float32 otherwise); float32 stays.
    """
    dtype = np.dtype(dtype)
    real = dtype.kind in "biu" or (dtype.kind in "fV" and jnp.issubdtype(dtype, jnp.floating))
    if not real:
        raise ValueError(f"{name} must hold real numbers (bool, integer or float), got dtype {dtype}")
    wide = dtype.kind == "f" and dtype.itemsize >= 8
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64 if wide else jnp.float32))


def check_input(x, name: str = "x", min_ndim: int = 2) -> tuple[jax.Array | np.ndarray, np.dtype]:
    """x (a NumPy or JAX array, other array-likes converted to NumPy; dtype unchanged) and the
    float dtype it is computed in (see `float_dtype`).

    ValueError naming `name` unless x is an array (not a Python list or tuple) of real numbers
    with at least `min_ndim` dims and no zero-length axis.
    """
    if isinstance(x, (list, tuple)):
        raise ValueError(f"{name} must be an array (NumPy or JAX), got a Python {type(x).__name__}; "
                         f"convert it with np.asarray")
    if not isinstance(x, (jax.Array, np.ndarray)):
        x = np.asarray(x)
    dtype = float_dtype(x.dtype, name)
    shape = tuple(x.shape)
    if len(shape) < min_ndim:
        expected = "(n, ...) with at least one feature axis" if min_ndim == 2 else f"at least {min_ndim} dims"
        raise ValueError(f"{name} must have shape {expected}, got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} has shape {shape}: every axis needs at least one entry (examples and features)")
    return x, dtype


def check_array(x, name: str = "x", min_ndim: int = 2) -> jax.Array:
    """`x` as a JAX array in its float dtype, after the checks of `check_input`."""
    x, dtype = check_input(x, name, min_ndim)
    return jnp.asarray(x).astype(dtype)


def host_matrix(x, name: str = "x") -> np.ndarray:
    """x: (n, ...) -> float64 NumPy (n, p), after the checks of `check_input` (for host-side code)."""
    x, _ = check_input(x, name)
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1).astype(np.float64)


def as_matrix(x: jax.Array, name: str = "x") -> jax.Array:
    """x: (n, ...) -> (n, p) in its float dtype, after `check_array`."""
    x = check_array(x, name)
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def check_pair(x, y, convert=as_matrix):
    """x: (n, ...), y: (n, ...) -> (n, p), (n, q) through `convert` (`as_matrix`, or `host_matrix`
    for host-side code) and its checks; ValueError unless x and y have the same n."""
    xm, ym = convert(x, "x"), convert(y, "y")
    if xm.shape[0] != ym.shape[0]:
        raise ValueError(
            f"x and y must be (n, ...) arrays with the same number n of examples; got {np.shape(x)} and {np.shape(y)}")
    return xm, ym


def pow2(k: jax.Array, dtype) -> jax.Array:
    """2.0**k exactly, from its bit pattern, for integer k in the normal range of `dtype`
    ([-126, 127] for float32); k outside it is clipped."""
    info = jnp.finfo(dtype)
    ints = jnp.int32 if info.bits == 32 else jnp.int64
    k = jnp.clip(jnp.asarray(k), info.minexp, info.maxexp - 1).astype(ints)
    return jax.lax.bitcast_convert_type((k + (info.maxexp - 1)) << info.nmant, dtype)


def times_pow2(x: jax.Array, k: jax.Array) -> jax.Array:
    """x·2^k for integer k (broadcast against x): exact unless the result itself under/overflows.

    Three factors cover shifts of up to three times the exponent range, so x·2^k is neither
    flushed to zero nor inf on the way when the result is representable.
    """
    info = jnp.finfo(x.dtype)
    k = jnp.clip(jnp.asarray(k), 3 * info.minexp, 3 * (info.maxexp - 1))
    for part in (k // 3, (k + 1) // 3, (k + 2) // 3):  # they sum to k
        x = x * pow2(part, x.dtype)
    return x


def scale_exponent(magnitude: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 k with magnitude·2^-k in [2, 4) (so 2^-k is a normal float), and whether that
    magnitude was positive, normal and finite (k = 0 otherwise)."""
    info = jnp.finfo(magnitude.dtype)
    _, e = jnp.frexp(magnitude)  # magnitude = f·2^e, f in [0.5, 1)
    valid = jnp.isfinite(magnitude) & (magnitude >= info.tiny)
    k = jnp.clip(e - 2, -(info.maxexp - 1), -info.minexp)
    return jnp.where(valid, k, 0).astype(jnp.int32), valid


def normalise(x: jax.Array, axis=None) -> tuple[jax.Array, jax.Array]:
    """(x·2^-k, k) with the largest |x| over `axis` (kept as size-1 dims) brought into [2, 4).

    Exact (a power of two). Zero, NaN or inf maxima leave x unchanged (k = 0), so NaN and inf
    propagate.
    """
    k, _ = scale_exponent(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    return x * pow2(-k, x.dtype), k


def center_features(x: jax.Array) -> jax.Array:
    """x: (..., n, p) -> x minus its mean over the n examples.

    The first example is subtracted before the mean, so constant features become exact zeros.
    The mean is a matmul with a ones vector: XLA:CPU reduces over the example axis several times
    slower than it multiplies.
    """
    x = x - x[..., :1, :]
    weights = jnp.full((1, x.shape[-2]), 1.0 / x.shape[-2], x.dtype)
    return x - jnp.matmul(weights, x, precision=HIGHEST)


def scaled_centred(x: jax.Array, axis=None) -> tuple[jax.Array, jax.Array]:
    """Feature-centred x·2^-k and k, x: (n, p) -> ((n, p), k), max |centred| over `axis` in [2, 4).

    Scaling before centring keeps huge values from overflowing; scaling again after it keeps a
    small spread around a large mean from underflowing in squares. Both scalings are exact, so
    the centred values equal the centred input times 2^-k. axis=None: one k for the matrix;
    axis=0: one per feature, (1, p).
    """
    x, k1 = normalise(x, axis)
    x, k2 = normalise(center_features(x), axis)
    return x, k1 + k2


def gram_linear(x: jax.Array) -> jax.Array:
    """Linear-kernel gram of the feature-centred representation, x: (n, ...) -> (n, n).

    Equals x xᵀ up to terms of the form a1ᵀ + 1aᵀ + c11ᵀ, which both centerings remove, so every
    HSIC and CKA value is unchanged; centering first avoids the float32 cancellation that large
    feature means would cause. The gram is in x's units squared: for |x| beyond about 1e±19 in
    float32 its entries leave float32's range (use `linear_cka` or `MinibatchCKA`, which are
    scale-proof).
    """
    xc, k = scaled_centred(as_matrix(x))
    return times_pow2(jnp.matmul(xc, xc.T, precision=HIGHEST), 2 * k)


def check_threshold(threshold) -> None:
    if isinstance(threshold, jax.core.Tracer):
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")


def gram_rbf(x: jax.Array, threshold: float = 1.0) -> jax.Array:
    """RBF gram exp(-d²/(2σ²)) with σ² = threshold² × median squared distance, x: (n, ...) -> (n, n).

    The median runs over all n² entries (diagonal included), as in Kornblith et al. 2019. The
    gram does not depend on x's scale, and is computed from exactly rescaled x.
    """
    check_threshold(threshold)
    x, _ = scaled_centred(as_matrix(x))
    dots = jnp.matmul(x, x.T, precision=HIGHEST)
    sq_norms = jnp.diagonal(dots)
    sq_dist = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * dots, 0)
    sq_dist = jnp.where(jnp.isfinite(dots), sq_dist, jnp.nan)
    bandwidth = 2 * threshold**2 * jnp.median(sq_dist)
    return jnp.exp(-sq_dist / bandwidth)


def check_gram(gram, name: str = "gram") -> jax.Array:
    """A square (..., n, n) gram as a float array; ValueError naming `name` otherwise."""
    gram = check_array(gram, name)
    if gram.shape[-2] != gram.shape[-1]:
        raise ValueError(f"{name} must be square, (..., n, n), got shape {gram.shape}")
    return gram


def check_gram_pair(gram_x, gram_y) -> tuple[jax.Array, jax.Array]:
    """Two checked grams of the same shape (see `check_gram`)."""
    gram_x, gram_y = check_gram(gram_x, "gram_x"), check_gram(gram_y, "gram_y")
    if gram_x.shape != gram_y.shape:
        raise ValueError(f"grams must have the same shape, got {gram_x.shape} and {gram_y.shape}")
    return gram_x, gram_y


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


def _scaled_center(gram: jax.Array, unbiased: bool, name: str) -> tuple[jax.Array, jax.Array]:
    """Rescaled and centred checked gram: (centred·2^-k, k), k of shape (..., 1, 1)."""
    if unbiased and gram.shape[-1] < 4:
        raise ValueError(f"the unbiased estimator needs n >= 4 examples, got {name} of shape {gram.shape}")
    gram, k = normalise(gram, axis=(-2, -1))
    return ucenter(gram, unbiased), k


def center_gram(gram: jax.Array, unbiased: bool = False) -> jax.Array:
    """Centres symmetric grams, gram: (..., n, n) -> (..., n, n).

    unbiased=False: H K H with H = I - 11ᵀ/n. unbiased=True: U-centering (zero diagonal, subtract
    row and column sums/(n-2), add total/((n-1)(n-2)), zero diagonal), so that
    <U(K), U(L)> / (n(n-3)) is the unbiased HSIC₁ of Song et al. 2012.
    """
    centred, k = _scaled_center(check_gram(gram), unbiased, "gram")
    return times_pow2(centred, k)


def hsic(gram_x: jax.Array, gram_y: jax.Array, unbiased: bool = False) -> jax.Array:
    """HSIC between two (n, n) grams: biased HSIC₀ = tr(KHLH)/(n-1)², or unbiased HSIC₁.

    Bilinear in the grams: computed from exactly rescaled grams, the result is the float rounding
    of the exact value (inf or 0 only where that lies outside the dtype's range).
    """
    gram_x, gram_y = check_gram_pair(gram_x, gram_y)
    kc, kx = _scaled_center(gram_x, unbiased, "gram_x")
    lc, ky = _scaled_center(gram_y, unbiased, "gram_y")
    n = kc.shape[-1]
    norm = n * (n - 3) if unbiased else (n - 1) ** 2
    value = jnp.sum(kc * lc, axis=(-2, -1)) / norm
    return times_pow2(value, (kx + ky)[..., 0, 0])
