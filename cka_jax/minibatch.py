"""Minibatch CKA (Nguyen, Raghu & Kornblith 2021) as an immutable, jit-friendly accumulator.

CKA = Σ_b HSIC₁(K_b, L_b) / (sqrt(Σ_b HSIC₁(K_b, K_b)) · sqrt(Σ_b HSIC₁(L_b, L_b))), with HSIC₁ the
unbiased estimator of Song et al. 2012 on each minibatch b. Every update builds each layer's gram
once, U-centres it, and gets the HSIC₁ of all layer pairs (of all model pairs, in population mode)
from one matmul of the stacked, flattened grams.

Scale: CKA does not depend on any layer's scale, and neither do the sums. Each layer (of each
model) has a power-of-two scale 2^k in the state, `log2_scale_*`: the largest range (max - min
over a minibatch's examples, of any feature) of its activations seen so far, brought into
[2, 4). Activations are divided by it before the grams, which is exact, so every minibatch keeps
its exact weight; when a later minibatch has a larger range, k grows and the sums so far are
multiplied by the matching power of two (again exact), so nothing under- or overflows for any
finite activations. The cost is one max/min reduction over each layer's activations per update.

Remainder batches: every update counts as one minibatch with equal weight, as in the definition
above. HSIC₁ is unbiased at any batch size n >= 4, so a smaller last batch keeps the estimate
unbiased but is noisier, and a new batch shape retraces a jitted update. The paper's code does
not drop it: its `load_test_data` batches with `drop_remainder=False`, and `update_state` in
`efficient_CKA.py` adds each batch's unnormalised <U(K_b), U(L_b)> = n_b(n_b - 3)·HSIC₁, so there
a short batch weighs n_b(n_b - 3) / (n(n - 3)) of a full one (CIFAR-10's 10,000 test examples in
batches of 256 end with 16 examples, weight 0.3%), while here it weighs as much as a full one.
For the same numbers, use equal-size minibatches (as `cka_jax.analysis` does) or drop the short
one.

A layer that is constant over a minibatch contributes zero; a layer constant over every minibatch
has undefined CKA and its entries are NaN. NaN or inf activations make the affected entries NaN.

Accumulators are pytrees: save them with orbax or `np.savez(path, *jax.tree.leaves(acc))`, and
combine runs, hosts or devices with `merge`. Sums are kept in float32 (float64 with
`jax_enable_x64`); bool, integer and 16-bit float activations are upcast before the grams.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cka_jax.hsic import (HIGHEST, check_array, check_input, check_threshold, float_dtype, gram_rbf, pow2,
                          scale_exponent, times_pow2, ucenter)

Activations = Union[Sequence[jax.Array], Mapping[str, jax.Array]]
KERNELS = ("linear", "rbf")
NO_SCALE = -(2**20)  # log2 scale of a layer not yet seen varying: below every real exponent
MAX_SHIFT = 400  # cap on a log2-scale increase: above any real one (exponents span < 300), and 4x it fits int32


def _named_layers(acts: Activations, side: str) -> list[tuple[str, jax.Array]]:
    if isinstance(acts, Mapping):
        items = [(f"{side}[{name!r}]", a) for name, a in acts.items()]
    elif isinstance(acts, (list, tuple)):
        items = [(f"{side}[{i}]", a) for i, a in enumerate(acts)]
    else:
        raise ValueError(f"{side} must be a list or a mapping of per-layer arrays, got {type(acts).__name__}")
    if not items:
        raise ValueError(f"{side} is empty: pass one activation array per layer")
    for name, a in items:
        check_input(a, name, min_ndim=0)  # dtype and empty axes; _check_layers checks the layout
    return items


def _check_layers(items: list[tuple[str, jax.Array]], num_models: int | None) -> int:
    """Validates shapes (at trace time) and returns the batch size."""
    lead = 1 if num_models is None else 2
    expected = "(batch, ...)" if num_models is None else f"({num_models} models, batch, ...)"
    sizes = []
    for name, a in items:
        shape = jnp.shape(a)
        if len(shape) < lead + 1 or (num_models is not None and shape[0] != num_models):
            raise ValueError(f"{name} must have shape {expected} with at least one feature axis, got {shape}")
        sizes.append((name, shape, shape[lead - 1]))
    first_name, first_shape, n = sizes[0]
    for name, shape, size in sizes[1:]:
        if size != n:
            raise ValueError(
                f"all layers need the same examples: {first_name} has shape {first_shape} but {name} has shape {shape}")
    if n < 4:
        raise ValueError(f"HSIC₁ needs at least 4 examples per minibatch, got {n} ({first_name} has shape {first_shape})")
    return n


CHUNK_ELEMENTS = 2**24  # largest feature slice (models x batch x features) copied at once: 64 MB in float32


def _as_models(a: jax.Array, population: bool) -> jax.Array:
    """Layer activations -> (M, n, p) (M = 1 outside population mode), dtype unchanged."""
    a = jnp.asarray(a)
    if not population:
        a = a[None]
    return a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))


def _applied(log2_scale: jax.Array) -> jax.Array:
    """The log2 scales activations are divided by: NO_SCALE (a layer not yet seen varying) by 2^0."""
    return jnp.where(log2_scale == NO_SCALE, 0, log2_scale)


def _spread_exponents(x: jax.Array) -> jax.Array:
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


def _shifted_linear_gram(x: jax.Array, log2_scale: jax.Array) -> jax.Array:
    """Grams of (x - x[:, :1])·2^-log2_scale, x: (M, n, p), log2_scale: (M,) -> (M, n, n), over
    feature chunks of bounded size.

    Subtracting the first example removes the features' common offset (so constant features are
    exact zeros and large means don't cost float32 precision); U-centering removes the rest, as
    it removes any a1ᵀ + 1aᵀ + c11ᵀ. Chunking keeps one shifted slice in memory at a time.
    """
    m, n, p = x.shape
    dtype = float_dtype(x.dtype)
    factor = pow2(-log2_scale, dtype)[:, None, None]

    def gram(part):
        part = part.astype(dtype) * factor
        part = part - part[:, :1]
        return jnp.einsum("mnp,mkp->mnk", part, part, precision=HIGHEST)

    chunk = max(128, CHUNK_ELEMENTS // (m * n) // 128 * 128)
    if p <= chunk:
        return gram(x)
    full = p // chunk

    def step(acc, i):
        return acc + gram(jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=2)), None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n, n), dtype), jnp.arange(full))
    return acc if p == full * chunk else acc + gram(x[:, :, full * chunk:])


def _linear_grams(items: list[tuple[str, jax.Array]], population: bool,
                  log2_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """U-centred linear grams (M, L, n, n) in the units of max(log2_scale (M, L), this batch's
    own scale), and those log2 scales."""
    xs = [_as_models(a, population) for _, a in items]
    scale = jnp.maximum(log2_scale, jnp.stack([_spread_exponents(x) for x in xs], axis=1))
    applied = _applied(scale)
    grams = [ucenter(_shifted_linear_gram(x, applied[:, i]), unbiased=True) for i, x in enumerate(xs)]
    return jnp.stack(grams, axis=1), scale


def _rbf_grams(items: list[tuple[str, jax.Array]], population: bool, threshold: float) -> jax.Array:
    """U-centred RBF grams (M, L, n, n); gram_rbf rescales exactly and upcasts to >= float32."""
    grams = [jax.vmap(lambda xi: gram_rbf(xi, threshold))(_as_models(a, population)) for _, a in items]
    return ucenter(jnp.stack(grams, axis=1), unbiased=True)


def _fit_grams(grams: jax.Array, log2_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """U-centred grams (M, L, n, n) of any finite scale -> the same in the units of
    max(log2_scale, the grams' own scale), and those log2 scales (M, L).

    A gram scales as its activations squared: log2 scale ceil(e / 2) for a largest entry of 2^e
    leaves entries of at most 1 after division by 4^scale (exact, a power of two).
    """
    k, valid = scale_exponent(jnp.max(jnp.abs(grams), axis=(-2, -1)))
    own = jnp.where(valid, (k + 3) // 2, NO_SCALE)  # largest entry < 2^(k + 2)
    scale = jnp.maximum(log2_scale, own)
    return times_pow2(grams, -2 * _applied(scale)[..., None, None]), scale


def minibatch_grams(acts: Activations, *, population: bool = False, kernel: str = "linear",
                    threshold: float = 1.0) -> jax.Array:
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
    items = _named_layers(acts, "acts")
    _check_layers(items, (jnp.shape(items[0][1]) or (0,))[0] if population else None)
    if kernel == "linear":
        models = jnp.shape(items[0][1])[0] if population else 1
        grams, scale = _linear_grams(items, population, jnp.full((models, len(items)), NO_SCALE, jnp.int32))
        grams = times_pow2(grams, 2 * _applied(scale)[..., None, None])
    else:
        grams = _rbf_grams(items, population, threshold)
    return grams if population else grams[0]


def _batch_hsic(ga: jax.Array, gb: jax.Array | None):
    """U-centred grams (Ma, La, n, n) [, (Mb, Lb, n, n)] -> HSIC₁ of all pairs (Ma, Mb, La, Lb), (Ma, La), (Mb, Lb)."""
    ma, la, n, _ = ga.shape
    fa = ga.reshape(ma * la, n * n)
    scale = 1.0 / (n * (n - 3))
    if gb is None:
        xy = jnp.matmul(fa, fa.T, precision=HIGHEST) * scale
        xx = jnp.diagonal(xy)
        yy, (mb, lb) = xx, (ma, la)
    else:
        mb, lb = gb.shape[:2]
        fb = gb.reshape(mb * lb, n * n)
        xy = jnp.matmul(fa, fb.T, precision=HIGHEST) * scale
        xx = jnp.sum(fa * fa, axis=1) * scale
        yy = jnp.sum(fb * fb, axis=1) * scale
    xy = xy.reshape(ma, la, mb, lb).transpose(0, 2, 1, 3)
    return xy, xx.reshape(ma, la), yy.reshape(mb, lb)


def _rescale(sums, shift_a: jax.Array, shift_b: jax.Array):
    """Sums (xy, xx, yy, boot_xy, boot_xx, boot_yy) -> the same after the log2 scales of model a's
    layers grow by shift_a (Ma, La) and model b's by shift_b (Mb, Lb), both >= 0.

    HSIC₁(K, L) is quadratic in each side's activations, so xy gains 2^-2(shift_a + shift_b) and
    xx 2^-4·shift_a: exact powers of two. A sum kept under NO_SCALE is zero (or NaN) and stays so.
    """
    shift_a, shift_b = jnp.minimum(shift_a, MAX_SHIFT), jnp.minimum(shift_b, MAX_SHIFT)
    k_xy = -2 * (shift_a[:, None, :, None] + shift_b[None, :, None, :])
    xy, xx, yy, bxy, bxx, byy = sums
    return (times_pow2(xy, k_xy), times_pow2(xx, -4 * shift_a), times_pow2(yy, -4 * shift_b),
            times_pow2(bxy, k_xy), times_pow2(bxx, -4 * shift_a), times_pow2(byy, -4 * shift_b))


def _combine(sums_1, scales_1, sums_2, scales_2):
    """Sums of two sets of minibatches, each with its log2 scales (a, b), in common units."""
    scale_a, scale_b = (jnp.maximum(s1, s2) for s1, s2 in zip(scales_1, scales_2))
    one = _rescale(sums_1, scale_a - scales_1[0], scale_b - scales_1[1])
    two = _rescale(sums_2, scale_a - scales_2[0], scale_b - scales_2[1])
    return tuple(s + t for s, t in zip(one, two)), (scale_a, scale_b)


@flax.struct.dataclass
class MinibatchCKA:
    """Running sums of HSIC₁ over minibatches for every layer pair (and model pair).

    Fields (Ma, Mb = 1 outside population mode; B = number of bootstrap replicates):
      xy: (Ma, Mb, La, Lb) Σ_b HSIC₁(K_b, L_b); xx: (Ma, La) Σ_b HSIC₁(K_b, K_b); yy: (Mb, Lb);
      all in units where each layer's activations are divided by 2^log2_scale.
      count: minibatches seen. boot_*: the same sums with Exponential(1) weights per minibatch
      (online Bayesian bootstrap over minibatches). key: raw PRNG key of those weights.
      log2_scale_a: (Ma, La) int32, log2_scale_b: (Mb, Lb) int32: each layer's power-of-two scale
      (see the module docstring); NO_SCALE until the layer varies.
    """
    xy: jax.Array
    xx: jax.Array
    yy: jax.Array
    count: jax.Array
    boot_xy: jax.Array
    boot_xx: jax.Array
    boot_yy: jax.Array
    key: jax.Array
    log2_scale_a: jax.Array
    log2_scale_b: jax.Array
    population: bool = flax.struct.field(pytree_node=False, default=False)
    kernel: str = flax.struct.field(pytree_node=False, default="linear")
    threshold: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, num_layers_a: int, num_layers_b: int | None = None, *, num_models_a: int | None = None,
               num_models_b: int | None = None, kernel: str = "linear", threshold: float = 1.0,
               num_bootstrap: int = 0, seed: int = 0) -> "MinibatchCKA":
        """An empty accumulator.

        num_layers_b=None compares model a with itself (`update(acts_a)`). Passing num_models_a
        turns on population mode: activations carry a leading model axis and the result holds
        every model pair, (Ma, Mb, La, Lb); num_models_b defaults to num_models_a.
        num_bootstrap > 0 keeps that many bootstrap replicates for `bootstrap_interval`; give
        accumulators that will be merged different seeds.
        """
        for name, value in (("num_layers_a", num_layers_a), ("num_layers_b", num_layers_b),
                            ("num_models_a", num_models_a), ("num_models_b", num_models_b)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_models_b is not None and num_models_a is None:
            raise ValueError("num_models_b needs num_models_a: population mode is set by num_models_a")
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
        check_threshold(threshold)
        if not _is_int(num_bootstrap) or num_bootstrap < 0:
            raise ValueError(f"num_bootstrap must be a non-negative integer, got {num_bootstrap!r}")
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        la, lb = num_layers_a, num_layers_a if num_layers_b is None else num_layers_b
        ma = 1 if num_models_a is None else num_models_a
        mb = ma if num_models_b is None else num_models_b
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
        zeros = lambda *shape: jnp.zeros(shape, dtype)
        return cls(xy=zeros(ma, mb, la, lb), xx=zeros(ma, la), yy=zeros(mb, lb),
                   count=jnp.zeros((), jnp.int32), boot_xy=zeros(num_bootstrap, ma, mb, la, lb),
                   boot_xx=zeros(num_bootstrap, ma, la), boot_yy=zeros(num_bootstrap, mb, lb),
                   key=jax.random.key_data(jax.random.key(seed)),
                   log2_scale_a=jnp.full((ma, la), NO_SCALE, jnp.int32),
                   log2_scale_b=jnp.full((mb, lb), NO_SCALE, jnp.int32),
                   population=num_models_a is not None, kernel=kernel, threshold=float(threshold))

    @property
    def num_bootstrap(self) -> int:
        return self.boot_xy.shape[0]

    @property
    def _sums(self):
        return self.xy, self.xx, self.yy, self.boot_xy, self.boot_xx, self.boot_yy

    @property
    def _scales(self):
        return self.log2_scale_a, self.log2_scale_b

    def _grams(self, items: list[tuple[str, jax.Array]], side: str, log2_scale: jax.Array):
        """One side's U-centred grams in the units of its updated log2 scales, those scales and n."""
        models, layers = self.xy.shape[0::2] if side == "acts_a" else self.xy.shape[1::2]
        if len(items) != layers:
            raise ValueError(f"{side} has {len(items)} layers, the accumulator expects {layers}")
        n = _check_layers(items, models if self.population else None)
        if self.kernel == "linear":
            grams, scale = _linear_grams(items, self.population, log2_scale)
        else:
            grams, scale = _fit_grams(_rbf_grams(items, self.population, self.threshold), log2_scale)
        return grams, scale, n

    def _check_within(self, side: str) -> None:
        if self.xy.shape[0::2] != self.xy.shape[1::2]:
            raise ValueError(f"{side} is required: this accumulator compares two different models "
                             f"(heatmap shape {self.xy.shape})")

    def _batch_stats(self, items_a, items_b, weights: jax.Array, scales):
        """HSIC₁ sums of one minibatch and their bootstrap-weighted copies, in the units of the
        returned log2 scales (scales grown to cover this minibatch)."""
        ga, scale_a, n = self._grams(items_a, "acts_a", scales[0])
        if items_b is None:
            self._check_within("acts_b")
            gb, scale_b = None, scale_a
        else:
            gb, scale_b, nb = self._grams(items_b, "acts_b", scales[1])
            if nb != n:
                raise ValueError(f"acts_a and acts_b need the same minibatch: {n} vs {nb} examples")
        return self._weighted(_batch_hsic(ga, gb), weights), (scale_a, scale_b)

    def _bootstrap_weights(self, first: jax.Array, k: int) -> jax.Array:
        """Exponential(1) weights (k, B) of minibatches first .. first + k - 1, fixed by seed and index."""
        key = jax.random.wrap_key_data(self.key)
        draw = lambda i: jax.random.exponential(jax.random.fold_in(key, i), (self.num_bootstrap,), self.xy.dtype)
        return jax.vmap(draw)(first + jnp.arange(k))

    def _weighted(self, stats, weights: jax.Array):
        """stats of one minibatch and their copies weighted by weights: (B,)."""
        stats = tuple(s.astype(self.xy.dtype) for s in stats)
        return stats + tuple(jnp.tensordot(weights, s, axes=0) for s in stats)

    def _add(self, sums, scales, batches) -> "MinibatchCKA":
        """This accumulator plus `sums` of `batches` minibatches kept in units of `scales`."""
        (xy, xx, yy, bxy, bxx, byy), (scale_a, scale_b) = _combine(self._sums, self._scales, sums, scales)
        return self.replace(xy=xy, xx=xx, yy=yy, count=self.count + batches, boot_xy=bxy, boot_xx=bxx,
                            boot_yy=byy, log2_scale_a=scale_a, log2_scale_b=scale_b)

    def update(self, acts_a: Activations, acts_b: Activations | None = None) -> "MinibatchCKA":
        """Adds one minibatch. acts_*: list or ordered mapping of per-layer arrays (batch, ...),
        (models, batch, ...) in population mode; acts_b=None compares model a with itself."""
        items_b = None if acts_b is None else _named_layers(acts_b, "acts_b")
        weights = self._bootstrap_weights(self.count, 1)[0]
        stats, scales = self._batch_stats(_named_layers(acts_a, "acts_a"), items_b, weights, self._scales)
        return self._add(stats, scales, 1)

    def update_grams(self, grams_a: jax.Array, grams_b: jax.Array | None = None) -> "MinibatchCKA":
        """Adds one minibatch from `minibatch_grams` outputs, (L, n, n) or (M, L, n, n), of any
        finite scale (each gram is rescaled exactly by a power of two per layer and model)."""
        grams, scales = [], []
        for name, g, (models, layers), scale in (("grams_a", grams_a, self.xy.shape[0::2], self.log2_scale_a),
                                                 ("grams_b", grams_b, self.xy.shape[1::2], self.log2_scale_b)):
            if g is None:
                continue
            g = check_array(g, name, min_ndim=0)
            expected = (models, layers) if self.population else (layers,)
            shape = g.shape
            if len(shape) != len(expected) + 2 or shape[:-2] != expected or shape[-1] != shape[-2]:
                raise ValueError(f"{name} must have shape {expected + ('n', 'n')}, got {shape}")
            if shape[-1] < 4:
                raise ValueError(f"HSIC₁ needs at least 4 examples per minibatch, got {name} of shape {shape}")
            fitted, scale = _fit_grams(g if self.population else g[None], scale)
            grams.append(fitted)
            scales.append(scale)
        if grams_b is None:
            self._check_within("grams_b")
            grams.append(None)
            scales.append(scales[0])
        elif grams[0].shape[-1] != grams[1].shape[-1]:
            raise ValueError(f"grams_a and grams_b need the same minibatch, got {jnp.shape(grams_a)} and "
                             f"{jnp.shape(grams_b)}")
        stats = self._weighted(_batch_hsic(*grams), self._bootstrap_weights(self.count, 1)[0])
        return self._add(stats, tuple(scales), 1)

    def update_sharded(self, acts_a: Activations, acts_b: Activations | None = None, *, mesh: Mesh,
                       axis_name: str = "batch") -> "MinibatchCKA":
        """Adds k minibatches spread over the devices of one mesh axis.

        acts_*: per-layer arrays with a leading minibatch axis, (k, batch, ...) or
        (k, models, batch, ...), k a multiple of the axis size. Each device accumulates its own
        minibatches with its own log2 scales; the devices then agree on the largest scales (one
        pmax), rescale their sums exactly and one psum combines them. Equals k calls of `update`.
        """
        items_a = _named_layers(acts_a, "acts_a")
        items_b = None if acts_b is None else _named_layers(acts_b, "acts_b")
        items = items_a + (items_b or [])
        devices = mesh.shape[axis_name]
        k = jnp.shape(items[0][1])[0] if jnp.ndim(items[0][1]) else 0
        if k == 0 or k % devices or any(jnp.shape(a)[:1] != (k,) for _, a in items):
            shapes = ", ".join(f"{name}: {jnp.shape(a)}" for name, a in items)
            raise ValueError(f"update_sharded needs every layer stacked as (k, ...) with the same k, a multiple of "
                             f"the {devices} devices on mesh axis {axis_name!r}; got {shapes}")
        labels_a = [name for name, _ in items_a]
        labels_b = None if items_b is None else [name for name, _ in items_b]

        def local(weights, arrays_a, arrays_b):
            def body(carry, i):
                sums, scales = carry
                batch_a = [(name, a[i]) for name, a in zip(labels_a, arrays_a)]
                batch_b = None if labels_b is None else [(name, b[i]) for name, b in zip(labels_b, arrays_b)]
                stats, new = self._batch_stats(batch_a, batch_b, weights[i], scales)
                sums = _rescale(sums, new[0] - scales[0], new[1] - scales[1])
                return (tuple(s + t for s, t in zip(sums, stats)), new), None

            zero = tuple(jnp.zeros_like(x) for x in self._sums)
            unset = tuple(jnp.full_like(s, NO_SCALE) for s in self._scales)
            start = jax.lax.pcast((zero, unset), (axis_name,), to="varying")
            (sums, scales), _ = jax.lax.scan(body, start, jnp.arange(weights.shape[0]))
            agreed = tuple(jax.lax.pmax(s, axis_name) for s in scales)
            sums = _rescale(sums, agreed[0] - scales[0], agreed[1] - scales[1])
            return jax.lax.psum(sums, axis_name), agreed

        # Auto axes: the result is an ordinary replicated array, usable outside any mesh context.
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        specs = (P(axis_name),) * 3
        args = (self._bootstrap_weights(self.count, k), [a for _, a in items_a],
                [] if items_b is None else [a for _, a in items_b])
        args = jax.device_put(args, tuple(NamedSharding(mesh, spec) for spec in specs))
        sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
        sums, scales = sharded(*args)
        return self._add(sums, scales, k)

    def merge(self, other: "MinibatchCKA") -> "MinibatchCKA":
        """Sums of two accumulators of the same shape (other hosts, runs or devices); sums kept at
        different log2 scales are rescaled exactly to the larger ones."""
        if not isinstance(other, MinibatchCKA):
            raise ValueError(f"can only merge another MinibatchCKA, got {type(other).__name__}")
        mine = (self.xy.shape, self.boot_xy.shape, self.population, self.kernel, self.threshold)
        theirs = (other.xy.shape, other.boot_xy.shape, other.population, other.kernel, other.threshold)
        if mine != theirs:
            raise ValueError(f"cannot merge accumulators of different layouts: (heatmap, bootstrap, population, "
                             f"kernel, threshold) = {mine} vs {theirs}")
        if (self.num_bootstrap and not isinstance(self.key, jax.core.Tracer)
                and not isinstance(other.key, jax.core.Tracer)
                and np.array_equal(self.key, other.key)):
            raise ValueError("both accumulators draw bootstrap weights from the same seed; create them with "
                             "different seeds (e.g. the host index) so their replicates are independent")
        return self._add(other._sums, other._scales, other.count)

    def _ratio(self, xy, xx, yy):
        """xy / (sqrt(xx)·sqrt(yy)): the roots are taken before the product, so it cannot overflow."""
        out = xy / (jnp.sqrt(xx)[..., :, None, :, None] * jnp.sqrt(yy)[..., None, :, None, :])
        return out if self.population else out[..., 0, 0, :, :]

    def result(self) -> jax.Array:
        """CKA heatmap (La, Lb), or (Ma, Mb, La, Lb) in population mode; NaN where undefined."""
        return self._ratio(self.xy, self.xx, self.yy)

    def bootstrap_samples(self) -> jax.Array:
        """CKA of each bootstrap replicate, (B, *result().shape)."""
        if not self.num_bootstrap:
            raise ValueError("this accumulator keeps no bootstrap replicates: create it with num_bootstrap > 0")
        return self._ratio(self.boot_xy, self.boot_xx, self.boot_yy)

    def bootstrap_interval(self, level: float = 0.95) -> tuple[jax.Array, jax.Array]:
        """Percentile bootstrap confidence interval over minibatches: (low, high), each like result().

        Replicates weight each minibatch by an independent Exponential(1) draw (the Bayesian
        bootstrap, Rubin 1981), the continuous counterpart of Poisson(1) resampling counts with
        the same mean and variance. The weights are never zero, so every replicate is defined
        (Poisson counts are all zero with probability e^-count, and such a replicate is 0/0);
        the interval is finite from 2 minibatches on. With fewer than 2 minibatches the spread
        over minibatches is unknown and the interval is NaN; NaN in the data gives NaN too.
        """
        if isinstance(level, bool) or not isinstance(level, (int, float, np.integer, np.floating)) \
                or not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1), got {level!r}")
        samples = self.bootstrap_samples()
        alpha = (1 - level) / 2
        enough = self.count >= 2
        return tuple(jnp.where(enough, jnp.quantile(samples, q, axis=0), jnp.nan) for q in (alpha, 1 - alpha))


def _is_int(value) -> bool:
    """A Python or NumPy integer, not a bool (True is not a layer count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
