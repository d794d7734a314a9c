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


def pow2(k: jax.Array, dtype: jnp.dtype) -> jax.Array:
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
