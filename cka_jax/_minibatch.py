"""Minibatch CKA (Nguyen, Raghu & Kornblith 2021) as an immutable, jit-friendly accumulator.

CKA = Σ_b HSIC₁(K_b, L_b) / (sqrt(Σ_b HSIC₁(K_b, K_b)) · sqrt(Σ_b HSIC₁(L_b, L_b))), with HSIC₁ the
unbiased estimator of Song et al. 2012 on each minibatch b. Every update builds each layer's gram
once, U-centres it, and gets the HSIC₁ of all layer pairs (of all model pairs, in population mode)
from one matmul of the stacked, flattened grams.

Scale: CKA does not depend on any layer's scale, and neither do the sums. Each layer (of each
model) has a power-of-two scale 2^k in the state, `log2_scale_*`: large enough that its U-centred
grams so far, divided by 4^k, have entries of at most 1. Dividing is exact, so every minibatch
keeps its exact weight; when a later minibatch has a larger gram, k grows and the sums so far
are multiplied by the matching power of two (again exact), so nothing under- or overflows for
any finite activations. Grams are built from the raw activations where that is as accurate, and
from shifted, exactly rescaled ones otherwise (`cka_jax._layer_grams`).

Remainder batches: every update counts as one minibatch with equal weight, as in the definition
above. HSIC₁ is unbiased at any batch size n >= 4, so a smaller last batch keeps the estimate
unbiased but is noisier, and a new batch shape retraces a jitted update. The paper's code does
not drop it: its `load_test_data` batches with `drop_remainder=False`, and `update_state` in
`efficient_CKA.py` adds each batch's unnormalised <U(K_b), U(L_b)> = n_b(n_b - 3)·HSIC₁, so there
a short batch weighs n_b(n_b - 3) / (n(n - 3)) of a full one (CIFAR-10's 10,000 test examples in
batches of 256 end with 16, weight 0.3%), here as much as a full one. For the same numbers, use
equal-size minibatches (as `cka_jax.analysis` does) or drop the short one.

A layer that is constant over a minibatch contributes zero; a layer constant over every minibatch
has undefined CKA and its entries are NaN. NaN or inf activations make the affected entries NaN.
Permutation p-values: num_permutations=P keeps P null replicates of the xy sums, model b's examples
permuted within each minibatch by gathering its grams (`cka_jax._permutations`).

Accumulators are pytrees: save them with orbax or `np.savez(path, *jax.tree.leaves(acc))`, and
combine runs, hosts or devices with `merge`. Sums are kept in float32 (float64 with
`jax_enable_x64`); bool, integer and 16-bit float activations are upcast before the grams.

Speed: every method checks its arguments on the host (shapes and dtypes only, so errors come at
once, also inside a caller's jit or vmap) and then runs one compiled program, cached per input
shapes, so an eager loop of `update` needs no jax.jit. On the CPU backend `update` builds the
linear grams of host and CPU arrays on the host, from the caller's buffers, with BLAS's
symmetric product in parallel (`cka_jax._host_grams`); under jit, on other devices and in
`update_sharded` compiled code builds them. `update(acts, acts)` (the same arrays for both
models) builds each layer's gram once. benchmarks/README.md has the measurements.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from cka_jax._checks import (
    Activations,
    Layout,
    check_count,
    check_minibatch,
    check_minibatch_grams,
    check_number,
    check_stacked,
    check_threshold,
    check_within,
    named_layers,
    one_minibatch,
    to_float,
)
from cka_jax._host_grams import owned_sides, update_sides
from cka_jax._hsic_sums import NO_SCALE, HsicSums, Scales, Totals, batch_hsic, cka_ratio, combine, weighted
from cka_jax._layer_grams import KERNELS, GramKind, LayerInputs, batch_totals, fit_grams, minibatch_grams, upper
from cka_jax._permutations import PermutationTests, null_sums, replicate_keys
from cka_jax._sharded_sums import sharded_totals

__all__ = ["MinibatchCKA", "minibatch_grams"]


def _static(default: Any) -> Any:
    """A dataclass field that is part of the pytree structure (hashable, fixed under jit)."""
    return dataclasses.field(default=default, metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MinibatchCKA(PermutationTests):
    """Running sums of HSIC₁ over minibatches for every layer pair (and model pair).

    Fields (Ma, Mb = 1 outside population mode; B = number of bootstrap replicates):
      xy: (Ma, Mb, La, Lb) Σ_b HSIC₁(K_b, L_b); xx: (Ma, La) Σ_b HSIC₁(K_b, K_b); yy: (Mb, Lb);
      all in units where each layer's activations are divided by 2^log2_scale.
      count: minibatches seen. boot_*: the same sums with Exponential(1) weights per minibatch
      (online Bayesian bootstrap over minibatches). key: raw PRNG key of those weights.
      log2_scale_a: (Ma, La) int32, log2_scale_b: (Mb, Lb) int32: each layer's power-of-two scale
      (see the module docstring); NO_SCALE until the layer varies.
      null_xy: (P, Ma, Mb, La, Lb) xy of P permutation-null replicates (`cka_jax._permutations`).
    population, kernel, threshold: static (part of the pytree structure, fixed under jit).
    `totals` gives the sums, bootstrap sums and scales as one named pytree.
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
    null_xy: jax.Array | None
    population: bool = _static(False)
    kernel: str = _static("linear")
    threshold: float = _static(1.0)

    @classmethod
    def create(
        cls,
        num_layers_a: int,
        num_layers_b: int | None = None,
        *,
        num_models_a: int | None = None,
        num_models_b: int | None = None,
        kernel: str = "linear",
        threshold: float = 1.0,
        num_bootstrap: int = 0,
        num_permutations: int = 0,
        seed: int = 0,
    ) -> MinibatchCKA:
        """An empty accumulator.

        num_layers_b=None compares model a with itself (`update(acts_a)`). Passing num_models_a
        turns on population mode: activations carry a leading model axis and the result holds
        every model pair, (Ma, Mb, La, Lb); num_models_b defaults to num_models_a.
        num_bootstrap > 0 keeps that many bootstrap replicates for `bootstrap_interval`; give
        accumulators that will be merged different seeds. num_permutations > 0 keeps that many
        permutation-null replicates (model b's examples permuted within each minibatch) for
        `p_values`, `row_max_p_values` and `null_mean`.
        """
        check_count(num_layers_a, "num_layers_a", 1)
        optional = {"num_layers_b": num_layers_b, "num_models_a": num_models_a, "num_models_b": num_models_b}
        for name, value in optional.items():
            if value is not None:
                check_count(value, name, 1)
        if num_models_b is not None and num_models_a is None:
            raise ValueError("num_models_b needs num_models_a: population mode is set by num_models_a")
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
        check_threshold(threshold)
        check_count(num_bootstrap, "num_bootstrap", 0)
        check_count(num_permutations, "num_permutations", 0)
        check_count(seed, "seed", None)
        if not -(2**63) <= seed < 2**63:
            raise ValueError(f"seed must fit in 64 bits, -2**63 <= seed < 2**63, got {seed!r}")
        la, lb = num_layers_a, num_layers_a if num_layers_b is None else num_layers_b
        ma = 1 if num_models_a is None else num_models_a
        mb = ma if num_models_b is None else num_models_b
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)

        def zeros(*lead: int) -> HsicSums:
            return HsicSums(*(jnp.zeros(lead + shape, dtype) for shape in ((ma, mb, la, lb), (ma, la), (mb, lb))))

        sums, boot = zeros(), zeros(num_bootstrap)
        return cls(
            xy=sums.xy,
            xx=sums.xx,
            yy=sums.yy,
            count=jnp.zeros((), jnp.int32),
            boot_xy=boot.xy,
            boot_xx=boot.xx,
            boot_yy=boot.yy,
            key=jax.random.key_data(jax.random.key(seed)),
            log2_scale_a=jnp.full((ma, la), NO_SCALE, jnp.int32),
            log2_scale_b=jnp.full((mb, lb), NO_SCALE, jnp.int32),
            null_xy=jnp.zeros((num_permutations, ma, mb, la, lb), dtype) if num_permutations else None,
            population=num_models_a is not None,
            kernel=kernel,
            threshold=float(threshold),
        )

    # ---- views of the state ----

    @property
    def num_bootstrap(self) -> int:
        return self.boot_xy.shape[0]

    @property
    def totals(self) -> Totals:
        """The sums, their bootstrap copies and their log2 scales."""
        return Totals(
            HsicSums(self.xy, self.xx, self.yy),
            HsicSums(self.boot_xy, self.boot_xx, self.boot_yy),
            Scales(self.log2_scale_a, self.log2_scale_b),
            self.null_xy,
        )

    @property
    def gram_kind(self) -> GramKind:
        return GramKind(self.population, self.kernel, self.threshold)

    @property
    def layouts(self) -> tuple[Layout, Layout]:
        """(models, layers) of model a and of model b."""
        ma, mb, la, lb = self.xy.shape
        return (ma, la), (mb, lb)

    def plus(self, totals: Totals, batches: jax.Array | int) -> MinibatchCKA:
        """This accumulator plus `totals` of `batches` more minibatches."""
        (xy, xx, yy), (boot_xy, boot_xx, boot_yy), (scale_a, scale_b), null_xy = combine(self.totals, totals)
        return dataclasses.replace(
            self,
            xy=xy,
            xx=xx,
            yy=yy,
            count=self.count + batches,
            boot_xy=boot_xy,
            boot_xx=boot_xx,
            boot_yy=boot_yy,
            log2_scale_a=scale_a,
            log2_scale_b=scale_b,
            null_xy=null_xy,
        )

    def bootstrap_weights(self, k: int) -> jax.Array:
        """Exponential(1) weights (k, B) of the next k minibatches, fixed by seed and index."""
        key = jax.random.wrap_key_data(self.key)

        def draw(i: jax.Array) -> jax.Array:
            return jax.random.exponential(jax.random.fold_in(key, i), (self.num_bootstrap,), self.xy.dtype)

        return jax.vmap(draw)(self.count + jnp.arange(k))

    def null_keys(self, k: int | None = None) -> jax.Array | None:
        """Raw keys (k, P, ...) of the next k minibatches' null replicates ((P, ...) for k None) or None."""
        keys = replicate_keys(self.key, self.count + jnp.arange(k or 1), self.num_permutations)
        return keys if keys is None or k else keys[0]

    # ---- the public operations: host-side checks, then one compiled call ----

    def update(self, acts_a: Activations, acts_b: Activations | None = None) -> MinibatchCKA:
        """Adds one minibatch. acts_*: list or ordered mapping of per-layer arrays (batch, ...),
        (models, batch, ...) in population mode; acts_b=None compares model a with itself."""
        items_b = None if acts_b is None else named_layers(acts_b, "acts_b")
        items_a = named_layers(acts_a, "acts_a")
        check_minibatch(items_a, items_b, self.layouts, self.population)
        return _update(self, *update_sides(items_a, items_b, self.population, self.kernel))

    def update_grams(self, grams_a: jax.Array, grams_b: jax.Array | None = None) -> MinibatchCKA:
        """Adds one minibatch from `minibatch_grams` outputs, (L, n, n) or (M, L, n, n), of any
        finite scale (each gram is rescaled exactly by a power of two per layer and model)."""
        layout_a, layout_b = self.layouts
        checked_a = check_minibatch_grams(grams_a, "grams_a", layout_a, self.population)
        if grams_b is None:
            check_within(self.layouts, "grams_b")
            return _update_grams(self, checked_a, None)
        checked_b = check_minibatch_grams(grams_b, "grams_b", layout_b, self.population)
        if checked_a.shape[-1] != checked_b.shape[-1]:
            raise ValueError(
                f"grams_a and grams_b need the same minibatch, got {tuple(checked_a.shape)} and "
                f"{tuple(checked_b.shape)}"
            )
        return _update_grams(self, checked_a, checked_b)

    def update_sharded(
        self, acts_a: Activations, acts_b: Activations | None = None, *, mesh: Mesh, axis_name: str = "batch"
    ) -> MinibatchCKA:
        """Adds k minibatches spread over the devices of one mesh axis.

        acts_*: per-layer arrays with a leading minibatch axis, (k, batch, ...) or
        (k, models, batch, ...), k a multiple of the axis size. Each device accumulates its own
        minibatches with its own log2 scales; the devices then agree on the largest scales (one
        pmax), rescale their sums exactly and one psum combines them. Equals k calls of `update`.
        """
        items_a = named_layers(acts_a, "acts_a")
        items_b = None if acts_b is None else named_layers(acts_b, "acts_b")
        check_stacked(items_a + (items_b or []), mesh, axis_name)
        check_minibatch(
            one_minibatch(items_a), None if items_b is None else one_minibatch(items_b), self.layouts, self.population
        )
        arrays_a, arrays_b, b_is_a = owned_sides(items_a, items_b, 1 + int(self.population))
        # Auto axes: the result is an ordinary replicated array, usable outside any mesh context.
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        return _update_sharded(self, arrays_a, arrays_b, b_is_a, mesh, axis_name)

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Sums of two accumulators of the same shape (other hosts, runs or devices); sums kept at
        different log2 scales are rescaled exactly to the larger ones."""
        if not isinstance(other, MinibatchCKA):
            raise ValueError(f"can only merge another MinibatchCKA, got {type(other).__name__}")
        mine, theirs = (
            (acc.xy.shape, acc.boot_xy.shape, acc.num_permutations, acc.population, acc.kernel, acc.threshold)
            for acc in (self, other)
        )
        if mine != theirs:
            raise ValueError(
                "cannot merge accumulators of different layouts: (heatmap, bootstrap, null replicates, population, "
                f"kernel, threshold) = {mine} vs {theirs}"
            )
        concrete = not isinstance(self.key, jax.core.Tracer) and not isinstance(other.key, jax.core.Tracer)
        if self.num_bootstrap and concrete and np.array_equal(self.key, other.key):
            raise ValueError(
                "both accumulators draw bootstrap weights from the same seed; create them with different seeds "
                "(e.g. the host index) so their replicates are independent"
            )
        return _merge(self, other)

    def result(self) -> jax.Array:
        """CKA heatmap (La, Lb), or (Ma, Mb, La, Lb) in population mode; NaN where undefined."""
        return _result(self)

    def bootstrap_samples(self) -> jax.Array:
        """CKA of each bootstrap replicate, (B, *result().shape)."""
        self._check_bootstrap()
        return _bootstrap_samples(self)

    def bootstrap_interval(self, level: float = 0.95) -> tuple[jax.Array, jax.Array]:
        """Percentile bootstrap confidence interval over minibatches: (low, high), each like result().

        Replicates weight each minibatch by an independent Exponential(1) draw (the Bayesian
        bootstrap, Rubin 1981), the continuous counterpart of Poisson(1) resampling counts with
        the same mean and variance. The weights are never zero, so every replicate is defined
        (Poisson counts are all zero with probability e^-count, and such a replicate is 0/0);
        the interval is finite from 2 minibatches on. With fewer than 2 minibatches the spread
        over minibatches is unknown and the interval is NaN; NaN in the data gives NaN too.
        """
        check_number(level, "level", lambda x: 0 < x < 1, "must lie in (0, 1)")
        self._check_bootstrap()
        return _bootstrap_interval(self, float(level))

    def _check_bootstrap(self) -> None:
        if not self.num_bootstrap:
            raise ValueError("this accumulator keeps no bootstrap replicates: create it with num_bootstrap > 0")


# ---- compiled operations: pure functions of the accumulator (a pytree) and the arrays. Module-level
# jit caches one program per input shapes; inside a caller's jit or vmap they are inlined. ----


@partial(jax.jit, static_argnames=("b_is_a", "modes"))
def _update(
    acc: MinibatchCKA,
    side_a: LayerInputs,
    side_b: LayerInputs | None,
    b_is_a: bool,
    modes: tuple[tuple[str, ...] | None, tuple[str, ...] | None],
) -> MinibatchCKA:
    weights, keys = acc.bootstrap_weights(1)[0], acc.null_keys()
    totals = batch_totals(acc.gram_kind, side_a, side_b, b_is_a, weights, acc.totals.scales, acc.xy.dtype, modes, keys)
    return acc.plus(totals, 1)


@jax.jit
def _update_grams(acc: MinibatchCKA, grams_a: jax.Array, grams_b: jax.Array | None) -> MinibatchCKA:
    def fitted(grams: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
        grams = to_float(grams)
        return fit_grams(upper(grams if acc.population else grams[None]), scale)

    scales = acc.totals.scales
    ga, scale_a = fitted(grams_a, scales.a)
    gb, scale_b = (None, scale_a) if grams_b is None else fitted(grams_b, scales.b)
    weights, null = acc.bootstrap_weights(1)[0], null_sums(ga, gb, acc.null_keys())
    return acc.plus(weighted(batch_hsic(ga, gb), weights, Scales(scale_a, scale_b), acc.xy.dtype, null), 1)


@partial(jax.jit, static_argnames=("b_is_a", "mesh", "axis_name"))
def _update_sharded(
    acc: MinibatchCKA,
    arrays_a: list[jax.Array],
    arrays_b: list[jax.Array] | None,
    b_is_a: bool,
    mesh: Mesh,
    axis_name: str,
) -> MinibatchCKA:
    k = arrays_a[0].shape[0]
    weights, keys = acc.bootstrap_weights(k), acc.null_keys(k)
    totals = sharded_totals(acc.gram_kind, acc.totals, weights, keys, arrays_a, arrays_b, b_is_a, mesh, axis_name)
    return acc.plus(totals, k)


@jax.jit
def _merge(acc: MinibatchCKA, other: MinibatchCKA) -> MinibatchCKA:
    return acc.plus(other.totals, other.count)


@jax.jit
def _result(acc: MinibatchCKA) -> jax.Array:
    return cka_ratio(acc.totals.sums, acc.population)


@jax.jit
def _bootstrap_samples(acc: MinibatchCKA) -> jax.Array:
    return cka_ratio(acc.totals.boot, acc.population)


@partial(jax.jit, static_argnames="level")
def _bootstrap_interval(acc: MinibatchCKA, level: float) -> tuple[jax.Array, jax.Array]:
    samples = cka_ratio(acc.totals.boot, acc.population)
    alpha = (1 - level) / 2
    enough = acc.count >= 2
    low, high = (jnp.where(enough, jnp.quantile(samples, q, axis=0), jnp.nan) for q in (alpha, 1 - alpha))
    return low, high
