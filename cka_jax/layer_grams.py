"""U-centred grams of one minibatch of per-layer activations, in power-of-two units (traced code).

Each layer (of each model) has a log2 scale: its activations are divided by 2^scale before the
gram, which is exact, and the scale grows to cover the largest range of activations seen, so the
grams never under- or overflow (see `cka_jax.minibatch`). `minibatch_grams` is the public entry.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cka_jax.checks import Activations, check_layers, check_threshold, float_dtype, named_layers
from cka_jax.hsic import rbf_gram, ucenter
from cka_jax.hsic_sums import NO_SCALE, Scales, Totals, applied, batch_hsic, weighted
from cka_jax.owned import owned_layers
from cka_jax.scaling import HIGHEST, pow2, scale_exponent, times_pow2

KERNELS = ("linear", "rbf")
CHUNK_ELEMENTS = 2**24  # largest feature slice (models x batch x features) copied at once: 64 MB in float32


class GramKind(NamedTuple):
    """How grams are built (hashable: a static argument of the compiled updates).

    population: activations carry a leading model axis. kernel: "linear" or "rbf" (bandwidth
    `threshold` × median distance, see `cka_jax.hsic.gram_rbf`).
    """

    population: bool
    kernel: str
    threshold: float


def as_models(a: jax.Array, population: bool) -> jax.Array:
    """Layer activations -> (M, n, p) (M = 1 outside population mode), dtype unchanged."""
    a = jnp.asarray(a)
    if not population:
        a = a[None]
    return a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))


def spread_exponents(x: jax.Array) -> jax.Array:
    """log2 scales (M,) of x: (M, n, p): the largest feature range over the examples, which
    bounds max|x - x[:, :1]|, brought into [2, 4); NO_SCALE where it is zero or not finite.

    Two reductions that read x once and write only (M, p): an elementwise pass over x before
    them (e.g. halving x) was materialised by XLA:CPU, 8 GB for 100 models x 20 layers. Halving
    the reduced extremes keeps their difference finite for any finite x.
    """
    dtype = float_dtype(x.dtype)
    high, low = jnp.max(x, axis=1).astype(dtype), jnp.min(x, axis=1).astype(dtype)
    k, valid = scale_exponent(jnp.max(high * 0.5 - low * 0.5, axis=1))
    return jnp.where(valid, k + 1, NO_SCALE)


def shifted_linear_gram(x: jax.Array, log2_scale: jax.Array) -> jax.Array:
    """Grams of (x - x[:, :1])·2^-log2_scale, x: (M, n, p), log2_scale: (M,) -> (M, n, n), over
    feature chunks of bounded size.

    Subtracting the first example removes the features' common offset (so constant features are
    exact zeros and large means don't cost float32 precision); U-centering removes the rest, as
    it removes any a1ᵀ + 1aᵀ + c11ᵀ. Chunking keeps one shifted slice in memory at a time.
    """
    m, n, p = x.shape
    dtype = float_dtype(x.dtype)
    factor = pow2(-log2_scale, dtype)[:, None, None]

    def gram(part: jax.Array) -> jax.Array:
        part = part.astype(dtype) * factor
        part = part - part[:, :1]
        return jnp.einsum("mnp,mkp->mnk", part, part, precision=HIGHEST)

    chunk = max(128, CHUNK_ELEMENTS // (m * n) // 128 * 128)
    if p <= chunk:
        return gram(x)
    full = p // chunk

    def step(acc: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        return acc + gram(jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=2)), None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n, n), dtype), jnp.arange(full))
    return acc if p == full * chunk else acc + gram(x[:, :, full * chunk :])


def _linear_grams(xs: list[jax.Array], log2_scale: jax.Array) -> jax.Array:
    """U-centred linear grams (M, L, n, n) of layers xs[l]: (M, n, p_l), divided by
    2^log2_scale[:, l] (M, L; applied scales, no NO_SCALE)."""
    return jnp.stack([ucenter(shifted_linear_gram(x, log2_scale[:, i]), True) for i, x in enumerate(xs)], axis=1)


def _rbf_grams(xs: list[jax.Array], threshold: jax.Array | float) -> jax.Array:
    """U-centred RBF grams (M, L, n, n); rbf_gram rescales exactly, in >= float32."""
    grams = [jax.vmap(lambda xi: rbf_gram(xi.astype(float_dtype(xi.dtype)), threshold))(x) for x in xs]
    return ucenter(jnp.stack(grams, axis=1), True)


def fit_grams(grams: jax.Array, log2_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """U-centred grams (M, L, n, n) of any finite scale -> the same in the units of
    max(log2_scale (M, L), the grams' own scale), and those log2 scales (M, L).

    A gram scales as its activations squared: log2 scale ceil(e / 2) for a largest entry of 2^e
    leaves entries of at most 1 after division by 4^scale (exact, a power of two).
    """
    k, valid = scale_exponent(jnp.max(jnp.abs(grams), axis=(-2, -1)))
    own = jnp.where(valid, (k + 3) // 2, NO_SCALE)  # largest entry < 2^(k + 2)
    scale = jnp.maximum(log2_scale, own)
    return times_pow2(grams, -2 * applied(scale)[..., None, None]), scale


def layer_grams(
    arrays: list[jax.Array], kind: GramKind, log2_scales: list[jax.Array]
) -> list[tuple[jax.Array, jax.Array]]:
    """U-centred grams (M, L, n, n) of one minibatch's layers, once per scale in `log2_scales`
    (each (M, L)): [(grams in the units of max(scale, this minibatch's own), those scales)].

    The grams are built once whatever the number of scales: activations passed as both model a
    and model b (each side with its own scales) cost one gram per layer, not two. Linear grams are
    built in the smallest of the updated scales and rescaled exactly to the others.
    """
    xs = [as_models(a, kind.population) for a in arrays]
    if kind.kernel == "rbf":
        grams = _rbf_grams(xs, kind.threshold)
        return [fit_grams(grams, s) for s in log2_scales]
    own = jnp.stack([spread_exponents(x) for x in xs], axis=1)
    scales = [jnp.maximum(s, own) for s in log2_scales]
    lowest = applied(scales[0])
    for s in scales[1:]:
        lowest = jnp.minimum(lowest, applied(s))
    grams = _linear_grams(xs, lowest)
    if len(scales) == 1:
        return [(grams, scales[0])]
    return [(times_pow2(grams, -2 * (applied(s) - lowest)[..., None, None]), s) for s in scales]


def batch_totals(
    kind: GramKind,
    arrays_a: list[jax.Array],
    arrays_b: list[jax.Array] | None,
    b_is_a: bool,
    weights: jax.Array,
    scales: Scales,
    dtype: jnp.dtype,
) -> Totals:
    """HSIC₁ sums of one minibatch, and their copies weighted by its bootstrap weights (B,), in
    units of `scales` grown to cover it. arrays_b None: model a against itself, as model b under
    b's own scales if b_is_a (the same arrays were passed for both), else the within-model heatmap."""
    if b_is_a:
        (ga, scale_a), (gb, scale_b) = layer_grams(arrays_a, kind, [scales.a, scales.b])
        return weighted(batch_hsic(ga, gb), weights, Scales(scale_a, scale_b), dtype)
    ((ga, scale_a),) = layer_grams(arrays_a, kind, [scales.a])
    if arrays_b is None:
        return weighted(batch_hsic(ga, None), weights, Scales(scale_a, scale_a), dtype)
    ((gb, scale_b),) = layer_grams(arrays_b, kind, [scales.b])
    return weighted(batch_hsic(ga, gb), weights, Scales(scale_a, scale_b), dtype)


@partial(jax.jit, static_argnames=("population", "kernel"))
def _minibatch_grams(arrays: list[jax.Array], population: bool, kernel: str, threshold: jax.Array) -> jax.Array:
    xs = [as_models(a, population) for a in arrays]
    if kernel == "rbf":
        grams = _rbf_grams(xs, threshold)
    else:
        own = applied(jnp.stack([spread_exponents(x) for x in xs], axis=1))
        grams = times_pow2(_linear_grams(xs, own), 2 * own[..., None, None])
    return grams if population else grams[0]


def minibatch_grams(
    acts: Activations, *, population: bool = False, kernel: str = "linear", threshold: float = 1.0
) -> jax.Array:
    """U-centred grams of one minibatch, for `MinibatchCKA.update_grams`.

    acts: per-layer arrays (batch, ...), or (models, batch, ...) with population=True.
    Returns (L, batch, batch), or (M, L, batch, batch) in population mode. Computing these for
    chunks of a population and concatenating them on axis 0 bounds the activation memory.
    Linear grams are in the activations' units squared (computed from exactly rescaled
    activations, then scaled back): in float32 they leave float32's range for activations beyond
    about 1e±19; `update_grams` itself accepts grams of any finite scale.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    check_threshold(threshold)
    items = named_layers(acts, "acts")
    check_layers(items, (tuple(items[0][1].shape) or (0,))[0] if population else None)
    return _minibatch_grams(owned_layers(items, int(bool(population))), bool(population), kernel, threshold)
