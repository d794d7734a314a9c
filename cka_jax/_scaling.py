"""Exact power-of-two scaling and feature centring, shared by every measure (traced code).

Every measure first multiplies its input by a power of two (exact in floating point) that brings
its largest magnitude near 1, and undoes it on the way out where the result has units (grams,
HSIC, centred grams). So CKA-type ratios never under- or overflow for finite inputs, and values
with units are the float rounding of the exact result (inf or 0 only where that result itself
lies outside the dtype's range).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
Axis = int | tuple[int, ...] | None


def _bits_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The signed integer dtype as wide as float `dtype` (its bit pattern's)."""
    return jnp.dtype(f"int{jnp.finfo(dtype).bits}")


def _clamped(k: jax.Array | int, low: int, high: int, dtype: jnp.dtype) -> jax.Array:
    """Integer k clamped to [low, high] (in its own integer dtype, so no value wraps), as `dtype`."""
    k = jnp.asarray(k)
    return jax.lax.clamp(jnp.asarray(low, k.dtype), k, jnp.asarray(high, k.dtype)).astype(dtype)


def _from_biased(biased: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """2.0**(biased - bias) from an integer exponent field in [1, 2·bias] (a normal float)."""
    shift = jnp.asarray(jnp.finfo(dtype).nmant, biased.dtype)
    return jax.lax.bitcast_convert_type(jax.lax.shift_left(biased, shift), dtype)


def pow2(k: jax.Array | int, dtype: jnp.dtype) -> jax.Array:
    """2.0**k exactly, from its bit pattern, for integer k in the normal range of `dtype`
    ([-126, 127] for float32); k outside it is clipped."""
    info = jnp.finfo(dtype)
    k = _clamped(k, info.minexp, info.maxexp - 1, _bits_dtype(dtype))
    return _from_biased(k + (info.maxexp - 1), dtype)


def pow2_factors(k: jax.Array | int, dtype: jnp.dtype) -> tuple[jax.Array, ...]:
    """Three normal powers of two whose product is 2^k, for integer k (clipped to three times the
    exponent range of `dtype`): 2^((k + j) // 3), j = 0, 1, 2, which sum to k (`times_factors`).

    Offsetting k by -3·minexp makes it non-negative, so truncating division floors, and each
    factor's exponent field is (k - 3·minexp + j) // 3 + minexp + bias, a normal float's.
    """
    info = jnp.finfo(dtype)
    low = 3 * info.minexp
    k = _clamped(k, low, 3 * (info.maxexp - 1), _bits_dtype(dtype)) - low
    three = jnp.asarray(3, k.dtype)
    return tuple(_from_biased(jax.lax.div(k + j, three) + (info.minexp + info.maxexp - 1), dtype) for j in range(3))


def times_factors(x: jax.Array, factors: tuple[jax.Array, ...]) -> jax.Array:
    """x times each of `factors` (`pow2_factors`, broadcast against x) in turn: exact unless the
    result itself under/overflows, as no partial product leaves the range on the way."""
    for factor in factors:
        x = x * factor
    return x


def times_pow2(x: jax.Array, k: jax.Array | int) -> jax.Array:
    """x·2^k for integer k (broadcast against x): exact unless the result itself under/overflows.

    Three factors (`pow2_factors`) cover shifts of up to three times the exponent range, so x·2^k
    is neither flushed to zero nor inf on the way when the result is representable.
    """
    return times_factors(x, pow2_factors(k, x.dtype))


def scale_exponent(magnitude: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 k with magnitude·2^-k in [2, 4) (so 2^-k is a normal float), and whether that
    magnitude was positive, normal and finite (k = 0 otherwise).

    For such a magnitude the exponent field of its bit pattern is e + bias with magnitude in
    [2^e, 2^(e + 1)), so k = e - 1.
    """
    info = jnp.finfo(magnitude.dtype)
    valid = jnp.isfinite(magnitude) & (magnitude >= info.tiny)
    ints = _bits_dtype(magnitude.dtype)
    field = jax.lax.shift_right_logical(
        jax.lax.bitcast_convert_type(magnitude, ints), jnp.asarray(info.nmant, ints)
    )  # the sign bit is 0 wherever valid
    k = field - (info.maxexp - 1) - 1
    return jnp.where(valid, k, 0).astype(jnp.int32), valid


def normalise(x: jax.Array, axis: Axis = None) -> tuple[jax.Array, jax.Array]:
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


def scaled_centred(x: jax.Array, axis: Axis = None) -> tuple[jax.Array, jax.Array]:
    """Feature-centred x·2^-k and k, x: (n, p) -> ((n, p), k), max |centred| over `axis` in [2, 4).

    Scaling before centring keeps huge values from overflowing; scaling again after it keeps a
    small spread around a large mean from underflowing in squares. Both scalings are exact, so
    the centred values equal the centred input times 2^-k. axis=None: one k for the matrix;
    axis=0: one per feature, (1, p).
    """
    x, k1 = normalise(x, axis)
    x, k2 = normalise(center_features(x), axis)
    return x, k1 + k2
