"""U-centred grams of one minibatch of per-layer activations, in power-of-two units (traced code).

A layer's gram is the raw x xᵀ (one dot, no pass over the activations before it) wherever that
is as accurate as the gram of the shifted activations x - x[0] (`raw_gram_usable`); otherwise,
and for NaN, inf or extreme scales, it is built from shifted activations exactly rescaled by a
power of two. On the CPU backend the host builds grams from the caller's arrays
(`cka_jax._host_grams`) and compiled code takes them as they are (`LayerInputs`). Each layer (of
each model) has a log2 scale: grams are divided by 4^scale, which is exact, and the scale grows
to cover the largest gram seen, so the sums never under- or overflow (see `cka_jax._minibatch`).
Grams travel as their strict upper triangles (`upper`). `minibatch_grams` is the public entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax._checks import Activations, check_layers, check_threshold, float_dtype, named_layers
from cka_jax._hsic import rbf_gram, ucenter
from cka_jax._hsic_sums import NO_SCALE, Scales, Totals, applied, batch_hsic, weighted
from cka_jax._owned import Array, owned_layers
from cka_jax._permutations import null_sums
from cka_jax._scaling import HIGHEST, pow2, scale_exponent, times_pow2

KERNELS = ("linear", "rbf")
CHUNK_ELEMENTS = 2**24  # largest feature slice (models x batch x features) copied at once: 64 MB in float32
AUTO, CENTRED, SHIFTED = "auto", "centred", "shifted"  # how a layer reaches its gram: see LayerInputs
MAX_OFFSET_RATIO = 32.0  # largest tr K / tr HKH at which a raw gram is used (see raw_gram_usable)


class LayerInputs(NamedTuple):
    """One side's minibatch as compiled code takes it, with a static mode per layer (`modes`).

    acts[l]: layer l's activations, (batch, ...) or (models, batch, ...), for modes AUTO (compiled
    code builds the raw gram and shifts where it must, `centred_linear_gram`) and SHIFTED (the
    host found neither its raw nor its shifted gram usable); None for mode CENTRED. centred:
    (M, L, D), the strict upper triangles (`upper`) of the U-centred grams the host built
    (`cka_jax._host_grams`) in the slots of CENTRED layers; None where there are none.
    """

    acts: Sequence[Array | None]
    centred: Array | None = None


class GramKind(NamedTuple):
    """How grams are built (hashable: a static argument of the compiled updates).

    population: activations carry a leading model axis. kernel: "linear" or "rbf" (bandwidth
    `threshold` × median distance, see `cka_jax._hsic.gram_rbf`).
    """

    population: bool
    kernel: str
    threshold: float


def as_models(a: Array, population: bool) -> jax.Array:
    """Layer activations -> (M, n, p) (M = 1 outside population mode), dtype unchanged."""
    a = jnp.asarray(a)
    if not population:
        a = a[None]
    return a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))


def _extremes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-feature max and min over the examples, x: (M, n, p) -> ((M, p), (M, p)), NaN propagating.

    A halving tree of elementwise maxima and minima: bit-identical to jnp.max/min over axis 1,
    which XLA:CPU runs several times slower at tens of thousands of features.
    """
    high = low = x
    while high.shape[1] > 1:
        half, odd = divmod(high.shape[1], 2)
        tail_high, tail_low = high[:, 2 * half :], low[:, 2 * half :]
        high = jnp.maximum(high[:, :half], high[:, half : 2 * half])
        low = jnp.minimum(low[:, :half], low[:, half : 2 * half])
        if odd:
            high = high.at[:, :1].max(tail_high)
            low = low.at[:, :1].min(tail_low)
    return high[:, 0], low[:, 0]


def spread_exponents(x: jax.Array) -> jax.Array:
    """log2 scales (M,) of x: (M, n, p): the largest feature range over the examples, which
    bounds max|x - x[:, :1]|, brought into [2, 4); NO_SCALE where it is zero or not finite.

    Halving the extremes keeps their difference finite for any finite x.
    """
    dtype = float_dtype(x.dtype)
    high, low = (e.astype(dtype) for e in _extremes(x))
    k, valid = scale_exponent(jnp.max(high * 0.5 - low * 0.5, axis=1))
    return jnp.where(valid, k + 1, NO_SCALE)


def _chunked_gram(x: jax.Array, prepare: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Σ over feature chunks of prepare(chunk) prepare(chunk)ᵀ, x: (M, n, p) -> (M, n, n).

    `prepare` (a cast, a shift) is materialised by XLA:CPU ahead of the dot: chunks of at most
    CHUNK_ELEMENTS bound that copy.
    """
    m, n, p = x.shape

    def gram(part: jax.Array) -> jax.Array:
        part = prepare(part)
        return jnp.einsum("mnp,mkp->mnk", part, part, precision=HIGHEST)

    chunk = max(128, CHUNK_ELEMENTS // (m * n) // 128 * 128)
    if p <= chunk:
        return gram(x)
    full = p // chunk

    def step(acc: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        return acc + gram(jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=2)), None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n, n), float_dtype(x.dtype)), jnp.arange(full))
    return acc if p == full * chunk else acc + gram(x[:, :, full * chunk :])


def raw_gram(x: jax.Array) -> jax.Array:
    """x xᵀ per model in x's float dtype, x: (M, n, p) -> (M, n, n): one dot, no pass before it
    (other dtypes are cast chunk by chunk)."""
    dtype = float_dtype(x.dtype)
    if x.dtype == dtype:
        return jnp.einsum("mnp,mkp->mnk", x, x, precision=HIGHEST)
    return _chunked_gram(x, lambda part: part.astype(dtype))


def shifted_linear_gram(x: jax.Array, log2_scale: jax.Array) -> jax.Array:
    """Grams of (x - x[:, :1])·2^-log2_scale, x: (M, n, p), log2_scale: (M,) -> (M, n, n), over
    feature chunks of bounded size.

    Subtracting the first example removes the features' common offset (so constant features are
    exact zeros and large means don't cost float32 precision); U-centering removes the rest, as
    it removes any a1ᵀ + 1aᵀ + c11ᵀ.
    """
    dtype = float_dtype(x.dtype)
    factor = pow2(-log2_scale, dtype)[:, None, None]

    def shifted(part: jax.Array) -> jax.Array:
        part = part.astype(dtype) * factor
        return part - part[:, :1]

    return _chunked_gram(x, shifted)


def raw_gram_usable(trace: Any, total: Any, n: int, dtype: Any) -> Any:
    """Whether raw grams are as accurate as shifted ones once U-centred, from their traces tr K
    and sums 1ᵀK1 (any shape, NumPy or JAX values), n examples, gram dtype; elementwise.

    Float rounding errs on an entry by about eps·sqrt(K_ii K_jj), while what U-centring keeps is
    of the order of the centred gram's trace tr(HKH) = tr K - 1ᵀK1/n: their ratio (1 + the
    features' squared means over their variance) bounds the precision lost to cancellation. The
    trace must also lie well inside the float range (an overflow, underflow, NaN or inf fails).
    """
    info = np.finfo(dtype)
    in_range = (trace >= n * math.sqrt(info.tiny)) & (trace <= info.max / (4 * n))  # NaN fails; Σ|K| <= n tr K
    return in_range & ((trace - total / n) * MAX_OFFSET_RATIO >= trace)


def centred_linear_gram(x: jax.Array, mode: str = AUTO) -> tuple[jax.Array, jax.Array]:
    """U-centred linear grams of x: (M, n, p) and their log2 units: ((M, n, n), (M,)), the grams
    of x equal to the result times 4^units.

    The raw gram x xᵀ costs one dot and nothing else; where it would lose precision (large
    feature means) or range (float32 activations beyond about 1e±12, NaN, inf), the gram is
    built again from the shifted, exactly rescaled activations (`shifted_linear_gram`), which
    mode SHIFTED does at once.
    """

    def shifted() -> tuple[jax.Array, jax.Array]:
        k = applied(spread_exponents(x))
        return ucenter(shifted_linear_gram(x, k), True), k

    if mode == SHIFTED:
        return shifted()
    raw = raw_gram(x)

    def as_is() -> tuple[jax.Array, jax.Array]:
        return ucenter(raw, True), jnp.zeros_like(raw[:, 0, 0], jnp.int32)  # zeros_like: varying in shard_map too

    trace, total = jnp.trace(raw, axis1=-2, axis2=-1), jnp.sum(raw, axis=(-2, -1))
    return jax.lax.cond(jnp.all(raw_gram_usable(trace, total, raw.shape[-1], raw.dtype)), as_is, shifted)


def _rbf_grams(xs: list[jax.Array], threshold: jax.Array | float) -> jax.Array:
    """U-centred RBF grams (M, L, n, n); rbf_gram rescales exactly, in >= float32."""
    grams = [jax.vmap(lambda xi: rbf_gram(xi.astype(float_dtype(xi.dtype)), threshold))(x) for x in xs]
    return ucenter(jnp.stack(grams, axis=1), True)


def upper(grams: jax.Array) -> jax.Array:
    """Strict upper triangles of symmetric grams, (..., n, n) -> (..., n(n - 1) / 2): all that a
    U-centred gram (zero diagonal) holds, in half the memory (<K, L> = 2 Σ_{i<j} K_ij L_ij)."""
    rows, cols = np.triu_indices(grams.shape[-1], 1)
    return grams[..., rows, cols]


def _compiled_grams(
    xs: list[jax.Array], kernel: str, threshold: jax.Array | float, modes: tuple[str, ...]
) -> tuple[jax.Array, jax.Array]:
    """U-centred grams (M, L, n, n) of layers xs[l]: (M, n, p_l) built here, and their log2 units (M, L)."""
    if kernel == "rbf":
        grams = _rbf_grams(xs, threshold)
        return grams, jnp.zeros(grams.shape[:2], jnp.int32)
    built = [centred_linear_gram(x, mode) for x, mode in zip(xs, modes, strict=True)]
    return jnp.stack([gram for gram, _ in built], axis=1), jnp.stack([units for _, units in built], axis=1)


def _centred_grams(side: LayerInputs, kind: GramKind, modes: tuple[str, ...] | None) -> tuple[jax.Array, jax.Array]:
    """Strict upper triangles (M, L, D) of one side's U-centred grams and their log2 units
    (M, L); modes: each layer's (None: AUTO for all)."""
    modes = modes or (AUTO,) * len(side.acts)
    built = [l for l, mode in enumerate(modes) if mode != CENTRED]
    centred = None if side.centred is None else jnp.asarray(side.centred)  # a traced array here
    if centred is not None and not built:
        return centred, jnp.zeros(centred.shape[:2], jnp.int32)
    xs = [as_models(a, kind.population) for l in built if (a := side.acts[l]) is not None]
    grams, units = _compiled_grams(xs, kind.kernel, kind.threshold, tuple(modes[l] for l in built))
    grams = upper(grams)
    if centred is None:
        return grams, units
    index = jnp.asarray(built)
    return centred.at[:, index].set(grams), jnp.zeros(centred.shape[:2], jnp.int32).at[:, index].set(units)


def fit_grams(grams: jax.Array, log2_scale: jax.Array, units: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """U-centred grams (M, L, D) (`upper` triangles) of any finite scale, times 4^units (M, L) ->
    the same in the units of max(log2_scale (M, L), the grams' own scale), and those log2 scales.

    A gram scales as its activations squared: log2 scale ceil(e / 2) for a largest entry of 2^e
    leaves entries of at most 1 after division by 4^scale (exact, a power of two).
    """
    k, valid = scale_exponent(jnp.max(jnp.abs(grams), axis=-1))
    own = jnp.where(valid, (k + 3) // 2 + units, NO_SCALE)  # largest entry < 2^(k + 2)·4^units
    scale = jnp.maximum(log2_scale, own)
    return times_pow2(grams, -2 * (applied(scale) - units)[..., None]), scale


def layer_grams(
    side: LayerInputs, kind: GramKind, log2_scales: list[jax.Array], modes: tuple[str, ...] | None = None
) -> list[tuple[jax.Array, jax.Array]]:
    """U-centred grams of one minibatch's layers as strict upper triangles (M, L, D), once per
    scale in `log2_scales` (each (M, L)): [(grams in the units of max(scale, this minibatch's
    own), those scales)].

    The grams are built once whatever the number of scales: activations passed as both model a
    and model b (each side with its own scales) cost one gram per layer, not two. modes: how each
    layer reaches its gram (`LayerInputs`; None: AUTO).
    """
    grams, units = _centred_grams(side, kind, modes)
    return [fit_grams(grams, s, units) for s in log2_scales]


def batch_totals(
    kind: GramKind,
    side_a: LayerInputs,
    side_b: LayerInputs | None,
    b_is_a: bool,
    weights: jax.Array,
    scales: Scales,
    dtype: jnp.dtype,
    modes: tuple[tuple[str, ...] | None, tuple[str, ...] | None] = (None, None),
    keys: jax.Array | None = None,
) -> Totals:
    """HSIC₁ sums of one minibatch, and their copies weighted by its bootstrap weights (B,), in
    units of `scales` grown to cover it. side_b None: model a against itself, as model b under
    b's own scales if b_is_a (the same arrays were passed for both), else the within-model heatmap.
    modes: how each side's layers reach their grams (see `LayerInputs`). keys: (P, ...) raw keys
    of the null replicates (`cka_jax._permutations`; None: none)."""
    if b_is_a:
        (ga, scale_a), (gb, scale_b) = layer_grams(side_a, kind, [scales.a, scales.b], modes[0])
    else:
        ((ga, scale_a),) = layer_grams(side_a, kind, [scales.a], modes[0])
        gb, scale_b = None, scale_a
        if side_b is not None:
            ((gb, scale_b),) = layer_grams(side_b, kind, [scales.b], modes[1])
    return weighted(batch_hsic(ga, gb), weights, Scales(scale_a, scale_b), dtype, null_sums(ga, gb, keys))


@partial(jax.jit, static_argnames=("population", "kernel"))
def _minibatch_grams(arrays: list[jax.Array], population: bool, kernel: str, threshold: jax.Array) -> jax.Array:
    xs = [as_models(a, population) for a in arrays]
    grams, units = _compiled_grams(xs, kernel, threshold, (AUTO,) * len(xs))
    grams = times_pow2(grams, 2 * units[..., None, None])
    return grams if population else grams[0]


def minibatch_grams(
    acts: Activations, *, population: bool = False, kernel: str = "linear", threshold: float = 1.0
) -> jax.Array:
    """U-centred grams of one minibatch, for `MinibatchCKA.update_grams`.

    Computing these for chunks of a population and concatenating them on axis 0 bounds the
    activation memory.

    Args:
        acts: per-layer arrays (batch, ...), or (models, batch, ...) with population=True: a list or
            ordered mapping.
        population: the arrays carry a leading model axis.
        kernel: "linear" or "rbf".
        threshold: RBF bandwidth as a multiple of the median distance.

    Returns:
        (L, batch, batch), or (M, L, batch, batch) in population mode. Linear grams are in the
        activations' units squared (computed from exactly rescaled activations, then scaled back):
        in float32 they leave float32's range for activations beyond about 1e±19; `update_grams`
        itself accepts grams of any finite scale.

    Raises:
        ValueError: an unknown kernel, an empty layer list, fewer than 4 examples, or invalid
            arrays.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    check_threshold(threshold)
    items = named_layers(acts, "acts")
    check_layers(items, (tuple(items[0][1].shape) or (0,))[0] if population else None)
    return _minibatch_grams(owned_layers(items, int(bool(population))), bool(population), kernel, threshold)
