"""Running HSIC₁ sums of minibatch CKA, kept in power-of-two units per layer (traced code).

`HsicSums` holds Σ_b HSIC₁ over minibatches for every layer pair (xy) and each layer with itself
(xx, yy), in units where each layer's activations are divided by 2^scale; `Scales` holds those
log2 scales for model a's and model b's layers; `Totals` bundles the plain sums, their
bootstrap-weighted copies, the permutation-null copies of xy (`cka_jax._permutations`) and the
scales. Sums kept at different scales are combined after an
exact power-of-two rescaling (see `cka_jax._minibatch` for why the scales exist).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cka_jax._scaling import HIGHEST, pow2_factors, times_factors

NO_SCALE = -(2**20)  # log2 scale of a layer not yet seen varying: below every real exponent
MAX_SHIFT = 400  # cap on a log2-scale increase: above any real one (exponents span < 300), and 4x it fits int32


class HsicSums(NamedTuple):
    """Σ_b HSIC₁ over minibatches; bootstrap copies carry a leading (B,) axis on every field.

    xy: (Ma, Mb, La, Lb) Σ_b HSIC₁(K_b, L_b) of every (model, layer) pair of a and b.
    xx: (Ma, La) Σ_b HSIC₁(K_b, K_b).  yy: (Mb, Lb) Σ_b HSIC₁(L_b, L_b).
    """

    xy: jax.Array
    xx: jax.Array
    yy: jax.Array


class Scales(NamedTuple):
    """int32 log2 scales of model a's layers, a: (Ma, La), and model b's, b: (Mb, Lb)."""

    a: jax.Array
    b: jax.Array


class Totals(NamedTuple):
    """Sums over some minibatches, their bootstrap-weighted copies (B, ...), their units, and the
    xy sums of the permutation null replicates, null: (P, Ma, Mb, La, Lb), or None (none kept:
    no zero-size array, which checkpointers such as orbax refuse)."""

    sums: HsicSums
    boot: HsicSums
    scales: Scales
    null: jax.Array | None


def applied(log2_scale: jax.Array) -> jax.Array:
    """The log2 scales activations are divided by: NO_SCALE (a layer not yet seen varying) by 2^0."""
    return jnp.where(log2_scale == NO_SCALE, 0, log2_scale)


def batch_hsic(ga: jax.Array, gb: jax.Array | None) -> HsicSums:
    """HSIC₁ sums of one minibatch of n examples from the strict upper triangles (D = n(n - 1)/2)
    of U-centred grams, ga: (Ma, La, D) and gb: (Mb, Lb, D), or within model a (gb None: yy = xx):
    all pairs from one matmul. A U-centred gram's diagonal is zero, so <K, L> = 2 Σ_{i<j} K_ij L_ij."""
    ma, la, d = ga.shape
    n = (1 + math.isqrt(1 + 8 * d)) // 2
    fa = ga.reshape(ma * la, d)
    scale = 2.0 / (n * (n - 3))
    if gb is None:
        xy = jnp.matmul(fa, fa.T, precision=HIGHEST) * scale
        xx = jnp.diagonal(xy)
        yy, (mb, lb) = xx, (ma, la)
    else:
        mb, lb = gb.shape[:2]
        fb = gb.reshape(mb * lb, d)
        xy = jnp.matmul(fa, fb.T, precision=HIGHEST) * scale
        xx = jnp.sum(fa * fa, axis=1) * scale
        yy = jnp.sum(fb * fb, axis=1) * scale
    xy = xy.reshape(ma, la, mb, lb).transpose(0, 2, 1, 3)
    return HsicSums(xy, xx.reshape(ma, la), yy.reshape(mb, lb))


def weighted(batch: HsicSums, weights: jax.Array, scales: Scales, dtype: jnp.dtype, null: jax.Array | None) -> Totals:
    """One minibatch's sums in `dtype`, with copies weighted by its bootstrap weights (B,), and its
    null replicates' xy sums (P, Ma, Mb, La, Lb) (not weighted)."""
    sums = HsicSums(*(s.astype(dtype) for s in batch))
    boot = HsicSums(*(jnp.tensordot(weights, s, axes=0) for s in sums))
    return Totals(sums, boot, scales, None if null is None else null.astype(dtype))


class Factors(NamedTuple):
    """The powers of two (`pow2_factors`, three per entry) that each field of `HsicSums` is
    multiplied by when the log2 scales grow: xy (Ma, Mb, La, Lb), xx (Ma, La), yy (Mb, Lb)."""

    xy: tuple[jax.Array, ...]
    xx: tuple[jax.Array, ...]
    yy: tuple[jax.Array, ...]


def _factors(shift: Scales, dtype: jnp.dtype) -> Factors:
    """The `Factors` of a growth of the log2 scales of model a's layers by shift.a (Ma, La) and of
    model b's by shift.b (Mb, Lb), both >= 0.

    HSIC₁(K, L) is quadratic in each side's activations, so xy gains 2^-2(shift_a + shift_b)
    and xx 2^-4·shift_a: exact powers of two.
    """
    shift_a, shift_b = jnp.minimum(shift.a, MAX_SHIFT), jnp.minimum(shift.b, MAX_SHIFT)
    xy = -2 * (shift_a[:, None, :, None] + shift_b[None, :, None, :])
    return Factors(*(pow2_factors(k, dtype) for k in (xy, -4 * shift_a, -4 * shift_b)))


def rescale(sums: HsicSums, factors: Factors) -> HsicSums:
    """Sums times the `Factors` of a growth of their scales; works on bootstrap copies too
    (factors broadcast from the right). A sum kept under NO_SCALE is zero (or NaN) and stays so."""
    return HsicSums(*(times_factors(s, f) for s, f in zip(sums, factors, strict=True)))


def _in_units(totals: Totals, scales: Scales) -> Totals:
    """totals re-expressed in larger (or equal) log2 scales; the factors are computed once for the
    sums, their bootstrap copies and the null replicates."""
    factors = _factors(Scales(scales.a - totals.scales.a, scales.b - totals.scales.b), totals.sums.xy.dtype)
    null = None if totals.null is None else times_factors(totals.null, factors.xy)
    return Totals(rescale(totals.sums, factors), rescale(totals.boot, factors), scales, null)


def combine(one: Totals, two: Totals) -> Totals:
    """Totals of two sets of minibatches, in the larger of their scales."""
    scales = Scales(jnp.maximum(one.scales.a, two.scales.a), jnp.maximum(one.scales.b, two.scales.b))
    one, two = _in_units(one, scales), _in_units(two, scales)
    sums, boot, null = jax.tree.map(jnp.add, (one.sums, one.boot, one.null), (two.sums, two.boot, two.null))
    return Totals(sums, boot, scales, null)


def agree(totals: Totals, axis_name: str) -> Totals:
    """Totals of every device along mesh axis `axis_name` (inside shard_map): the devices agree on
    the largest scales (one pmax), rescale their own sums exactly, and one psum adds them."""
    scales = Scales(*(jax.lax.pmax(s, axis_name) for s in totals.scales))
    local = _in_units(totals, scales)
    sums, boot, null = jax.lax.psum((local.sums, local.boot, local.null), axis_name)
    return Totals(sums, boot, scales, null)


def cka_ratio(sums: HsicSums, population: bool) -> jax.Array:
    """xy / (sqrt(xx)·sqrt(yy)), (..., Ma, Mb, La, Lb), or (..., La, Lb) outside population mode:
    the roots are taken before the product, so it cannot overflow."""
    out = sums.xy / (jnp.sqrt(sums.xx)[..., :, None, :, None] * jnp.sqrt(sums.yy)[..., None, :, None, :])
    return out if population else out[..., 0, 0, :, :]
