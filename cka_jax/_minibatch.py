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

Remainder batches count as one minibatch each, with the same weight as a full one (the guide on
MinibatchCKA compares this with the paper's code).

Permutation p-values: num_permutations=P keeps P null replicates of the xy sums, model b's examples
permuted within each minibatch by gathering its grams (`cka_jax._permutations`).

A layer that is constant over a minibatch contributes zero; a layer constant over every minibatch
has undefined CKA and its entries are NaN. NaN or inf activations make the affected entries NaN.

Accumulators are pytrees: save them with orbax or `np.savez(path, *jax.tree.leaves(acc))`, and
combine runs, hosts or devices with `merge`. Sums are kept in float32 (float64 with
`jax_enable_x64`); bool, integer and 16-bit float activations are upcast before the grams.

Every method checks its arguments on the host, then runs one compiled program per input shape
(`cka_jax._minibatch_ops`); on the CPU backend `update` builds linear grams on the host with BLAS
(`cka_jax._host_grams`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from cka_jax import _minibatch_ops as ops
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
)
from cka_jax._host_grams import owned_sides, update_sides
from cka_jax._hsic_sums import NO_SCALE, HsicSums, Scales, Totals
from cka_jax._layer_grams import KERNELS, GramKind, minibatch_grams
from cka_jax._permutations import PermutationTests

__all__ = ["MinibatchCKA", "minibatch_grams"]


def _static(default: Any) -> Any:
    """A dataclass field that is part of the pytree structure (hashable, fixed under jit)."""
    return dataclasses.field(default=default, metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MinibatchCKA(PermutationTests):
    """Running sums of HSIC₁ over minibatches for every layer pair (and model pair).

    CKA = Σ_b HSIC₁(K_b, L_b) / (sqrt(Σ_b HSIC₁(K_b, K_b)) · sqrt(Σ_b HSIC₁(L_b, L_b))) over
    minibatches b, with HSIC₁ the unbiased estimator of Song et al. 2012. An immutable pytree: every
    method returns a new accumulator, and it works inside `jax.jit`, `jax.vmap` and `jax.shard_map`.
    Build one with `create`, feed it with `update` (or `update_grams`, `update_sharded`), combine
    with `merge`, read it with `result` and `bootstrap_interval`.

    Attributes:
        xy: (Ma, Mb, La, Lb) Σ_b HSIC₁(K_b, L_b), in units where each layer's activations are divided
            by 2^log2_scale (Ma, Mb = 1 outside population mode).
        xx: (Ma, La) Σ_b HSIC₁(K_b, K_b).
        yy: (Mb, Lb) Σ_b HSIC₁(L_b, L_b).
        count: minibatches seen.
        boot_xy: (B, Ma, Mb, La, Lb) the sums with Exponential(1) weights per minibatch (online
            Bayesian bootstrap over minibatches; B replicates); boot_xx and boot_yy likewise.
        key: raw PRNG key of the bootstrap weights.
        log2_scale_a: (Ma, La) int32 power-of-two scale of each layer of model a (NO_SCALE until the
            layer varies); log2_scale_b: (Mb, Lb) the same for model b.
        null_xy: (P, Ma, Mb, La, Lb) xy of P permutation-null replicates (`cka_jax._permutations`),
            None without them.
        population: static (part of the pytree structure, fixed under jit): population mode.
        kernel: static: "linear" or "rbf".
        threshold: static: the RBF bandwidth as a multiple of the median distance.

    References:
        Nguyen, Raghu & Kornblith, *Do Wide and Deep Networks Learn the Same Things? Uncovering
        How Neural Network Representations Vary with Width and Depth*, ICLR 2021.

    Example:
        >>> import numpy as np
        >>> from cka_jax import MinibatchCKA
        >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
        >>> acc = MinibatchCKA.create(2)
        >>> for batch in np.split(x, 4):
        ...     acc = acc.update([batch, 2 * batch])  # two "layers" of 16 examples each
        >>> np.round(np.asarray(acc.result()), 3)
        array([[1., 1.],
               [1., 1.]], dtype=float32)
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
        seed: int = 0,
        num_permutations: int = 0,
    ) -> MinibatchCKA:
        """An empty accumulator.

        Args:
            num_layers_a: La, the number of layers of model a (≥ 1).
            num_layers_b: Lb, the number of layers of model b; None compares model a with itself
                (`update(acts_a)`).
            num_models_a: turns on population mode: activations carry a leading model axis and the
                result holds every model pair, (Ma, Mb, La, Lb).
            num_models_b: Mb; defaults to num_models_a.
            kernel: "linear" or "rbf".
            threshold: RBF bandwidth as a multiple of the median distance; finite and > 0.
            num_bootstrap: B ≥ 0 bootstrap replicates kept for `bootstrap_interval`.
            seed: seed of the bootstrap weights and permutations; give accumulators that will be merged
                different seeds.
            num_permutations: P ≥ 0 permutation-null replicates (model b's examples permuted within
                each minibatch) kept for `p_values`, `row_max_p_values` and `null_mean`.

        Returns:
            A `MinibatchCKA` with zero sums.

        Raises:
            ValueError: a count that is not a positive integer (bools included: `create(True)`), an
                unknown kernel, or a threshold that is not a finite number > 0.
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
        """B, the number of bootstrap replicates kept."""
        return self.boot_xy.shape[0]

    @property
    def totals(self) -> Totals:
        """The sums, their bootstrap copies and their log2 scales, as one named pytree."""
        return Totals(
            HsicSums(self.xy, self.xx, self.yy),
            HsicSums(self.boot_xy, self.boot_xx, self.boot_yy),
            Scales(self.log2_scale_a, self.log2_scale_b),
            self.null_xy,
        )

    @property
    def gram_kind(self) -> GramKind:
        """How grams are built: population mode, kernel and threshold (static)."""
        return GramKind(self.population, self.kernel, self.threshold)

    @property
    def layouts(self) -> tuple[Layout, Layout]:
        """(models, layers) of model a and of model b."""
        ma, mb, la, lb = self.xy.shape
        return (ma, la), (mb, lb)

    # ---- the public operations: host-side checks, then one compiled call ----

    def update(self, acts_a: Activations, acts_b: Activations | None = None) -> MinibatchCKA:
        """Adds one minibatch.

        Args:
            acts_a: per-layer activations of model a: a list or ordered mapping of La arrays
                (batch, ...), or (models, batch, ...) in population mode.
            acts_b: the same for model b, over the same examples; None compares model a with itself.

        Returns:
            The updated accumulator (self is unchanged).

        Raises:
            ValueError: wrong layer or model counts, fewer than 4 examples, example counts that differ
                between layers, or inputs that are not numeric arrays (see the measures' checks).
        """
        items_b = None if acts_b is None else named_layers(acts_b, "acts_b")
        items_a = named_layers(acts_a, "acts_a")
        check_minibatch(items_a, items_b, self.layouts, self.population)
        return ops.update(self, *update_sides(items_a, items_b, self.population, self.kernel))

    def update_grams(self, grams_a: jax.Array, grams_b: jax.Array | None = None) -> MinibatchCKA:
        """Adds one minibatch from U-centred grams (`minibatch_grams` outputs).

        Args:
            grams_a: (La, n, n), or (Ma, La, n, n) in population mode, of any finite scale (each gram
                is rescaled exactly by a power of two per layer and model).
            grams_b: the same for model b; None compares model a with itself.

        Returns:
            The updated accumulator.

        Raises:
            ValueError: wrong shapes, minibatches that differ between a and b, or grams that are not
                symmetric and U-centred (zero diagonal and row sums) beyond rounding.
        """
        layout_a, layout_b = self.layouts
        checked_a = check_minibatch_grams(grams_a, "grams_a", layout_a, self.population)
        if grams_b is None:
            check_within(self.layouts, "grams_b")
            return ops.update_grams(self, checked_a, None)
        checked_b = check_minibatch_grams(grams_b, "grams_b", layout_b, self.population)
        if checked_a.shape[-1] != checked_b.shape[-1]:
            raise ValueError(
                f"grams_a and grams_b need the same minibatch, got {tuple(checked_a.shape)} and "
                f"{tuple(checked_b.shape)}"
            )
        return ops.update_grams(self, checked_a, checked_b)

    def update_sharded(
        self, acts_a: Activations, acts_b: Activations | None = None, *, mesh: Mesh, axis_name: str = "batch"
    ) -> MinibatchCKA:
        """Adds k minibatches spread over the devices of one mesh axis.

        Each device accumulates its own minibatches with its own log2 scales; the devices then agree
        on the largest scales (one pmax), rescale their sums exactly and one psum combines them.

        Args:
            acts_a: per-layer arrays with a leading minibatch axis, (k, batch, ...) or
                (k, models, batch, ...), k a multiple of the axis size.
            acts_b: the same for model b; None compares model a with itself.
            mesh: the `jax.sharding.Mesh` to spread over.
            axis_name: the mesh axis the minibatches are spread over.

        Returns:
            The updated accumulator, equal to k calls of `update`.

        Raises:
            ValueError: as `update`, or k is not a multiple of the axis size or the axis is not in mesh.
        """
        items_a = named_layers(acts_a, "acts_a")
        items_b = None if acts_b is None else named_layers(acts_b, "acts_b")
        check_stacked(items_a + (items_b or []), mesh, axis_name)
        check_minibatch(
            one_minibatch(items_a),
            None if items_b is None else one_minibatch(items_b),
            self.layouts,
            self.population,
        )
        arrays_a, arrays_b, b_is_a = owned_sides(items_a, items_b, 1 + int(self.population))
        # Auto axes: the result is an ordinary replicated array, usable outside any mesh context.
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        return ops.update_sharded(self, arrays_a, arrays_b, b_is_a, mesh, axis_name)

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Sums of two accumulators of the same shape (other hosts, runs or devices).

        Args:
            other: a `MinibatchCKA` with the same layouts, kernel and bootstrap count.

        Returns:
            The accumulator of both sets of minibatches; sums kept at different log2 scales are rescaled
            exactly to the larger ones.

        Raises:
            ValueError: other is not a `MinibatchCKA` or differs in shape or kind.
        """
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
        return ops.merge(self, other)

    def result(self) -> jax.Array:
        """The CKA heatmap.

        Returns:
            (La, Lb), or (Ma, Mb, La, Lb) in population mode; NaN where undefined (a layer constant on
            every minibatch, NaN or inf in the data, or no minibatch yet).
        """
        return ops.result(self)

    def bootstrap_samples(self) -> jax.Array:
        """CKA of each bootstrap replicate.

        Returns:
            (B, La, Lb), or (B, Ma, Mb, La, Lb) in population mode.

        Raises:
            ValueError: the accumulator keeps no bootstrap replicates (num_bootstrap=0).
        """
        self._check_bootstrap()
        return ops.bootstrap_samples(self)

    def bootstrap_interval(self, level: float = 0.95) -> tuple[jax.Array, jax.Array]:
        """Percentile bootstrap confidence interval over minibatches.

        Replicates weight each minibatch by an independent Exponential(1) draw (the Bayesian
        bootstrap, Rubin 1981), the continuous counterpart of Poisson(1) resampling counts with
        the same mean and variance. The weights are never zero, so every replicate is defined
        (Poisson counts are all zero with probability e^-count, and such a replicate is 0/0).

        Args:
            level: the confidence level, in (0, 1).

        Returns:
            (low, high), each shaped like `result()`; finite from 2 minibatches on, NaN with fewer (the
            spread over minibatches is unknown) or with NaN data.

        Raises:
            ValueError: no bootstrap replicates are kept, or level is outside (0, 1).
        """
        check_number(level, "level", lambda x: 0 < x < 1, "must lie in (0, 1)")
        self._check_bootstrap()
        return ops.bootstrap_interval(self, float(level))

    def _check_bootstrap(self) -> None:
        if not self.num_bootstrap:
            raise ValueError("this accumulator keeps no bootstrap replicates: create it with num_bootstrap > 0")
