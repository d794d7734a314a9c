"""Minibatch CKA (Nguyen, Raghu & Kornblith 2021) as an immutable, jit-friendly accumulator.

CKA = Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)), with HSIC₁ the unbiased
estimator of Song et al. 2012 on each minibatch b. Every update builds each layer's gram once,
U-centres it, and gets the HSIC₁ of all layer pairs (of all model pairs, in population mode) from
one matmul of the stacked, flattened grams.

Remainder batches: every update counts as one minibatch with equal weight, as in the definition
above. HSIC₁ is unbiased at any batch size n >= 4, so a smaller last batch keeps the estimate
unbiased but is noisier, and a new batch shape retraces a jitted update; dropping it (as the
paper's code does) is the usual choice.

A layer that is constant over a minibatch contributes zero; a layer constant over every minibatch
has undefined CKA and its entries are NaN. NaN or inf activations make the affected entries NaN.

Accumulators are pytrees: save them with orbax or `np.savez(path, *jax.tree.leaves(acc))`, and
combine runs, hosts or devices with `merge`. Sums are kept in float32 (float64 with
`jax_enable_x64`); bfloat16 activations are upcast before the grams.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cka_jax.hsic import HIGHEST, center_gram, gram_rbf

Activations = Union[Sequence[jax.Array], Mapping[str, jax.Array]]
KERNELS = ("linear", "rbf")


def _named_layers(acts: Activations, side: str) -> list[tuple[str, jax.Array]]:
    if isinstance(acts, Mapping):
        items = [(f"{side}[{name!r}]", a) for name, a in acts.items()]
    elif isinstance(acts, (list, tuple)):
        items = [(f"{side}[{i}]", a) for i, a in enumerate(acts)]
    else:
        raise ValueError(f"{side} must be a list or a mapping of per-layer arrays, got {type(acts).__name__}")
    if not items:
        raise ValueError(f"{side} is empty: pass one activation array per layer")
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


def _shifted_linear_gram(x: jax.Array) -> jax.Array:
    """Grams of (x - x[:, :1]), x: (M, n, p) -> (M, n, n), over feature chunks of bounded size.

    Subtracting the first example removes the features' common offset (so constant features are
    exact zeros and large means don't cost float32 precision); U-centering removes the rest, as
    it removes any a1ᵀ + 1aᵀ + c11ᵀ. Chunking keeps one shifted slice in memory at a time.
    """
    m, n, p = x.shape
    dtype = jnp.promote_types(x.dtype, jnp.float32)

    def gram(part):
        part = part.astype(dtype)
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


def _ucentred_grams(items: list[tuple[str, jax.Array]], population: bool, kernel: str,
                    threshold: float) -> jax.Array:
    """Per-layer activations -> U-centred grams (M, L, n, n) (M = 1 outside population mode)."""
    grams = []
    for _, a in items:
        a = jnp.asarray(a)
        if not population:
            a = a[None]
        x = a.reshape(a.shape[0], a.shape[1], -1)
        if kernel == "linear":
            g = _shifted_linear_gram(x)
        else:
            g = jax.vmap(lambda xi: gram_rbf(xi, threshold))(x)  # gram_rbf upcasts to >= float32
        grams.append(center_gram(g, unbiased=True))
    return jnp.stack(grams, axis=1)


def minibatch_grams(acts: Activations, *, population: bool = False, kernel: str = "linear",
                    threshold: float = 1.0) -> jax.Array:
    """U-centred grams of one minibatch, for `MinibatchCKA.update_grams`.

    acts: per-layer arrays (batch, ...), or (models, batch, ...) with population=True.
    Returns (L, batch, batch), or (M, L, batch, batch) in population mode. Computing these for
    chunks of a population and concatenating them on axis 0 bounds the activation memory.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    items = _named_layers(acts, "acts")
    _check_layers(items, (jnp.shape(items[0][1]) or (0,))[0] if population else None)
    grams = _ucentred_grams(items, population, kernel, threshold)
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


@flax.struct.dataclass
class MinibatchCKA:
    """Running sums of HSIC₁ over minibatches for every layer pair (and model pair).

    Fields (Ma, Mb = 1 outside population mode; B = number of bootstrap replicates):
      xy: (Ma, Mb, La, Lb) Σ_b HSIC₁(K_b, L_b); xx: (Ma, La) Σ_b HSIC₁(K_b, K_b); yy: (Mb, Lb).
      count: minibatches seen. boot_*: the same sums with Poisson(1) weights per minibatch
      (online bootstrap over minibatches). key: raw PRNG key of those weights.
    """
    xy: jax.Array
    xx: jax.Array
    yy: jax.Array
    count: jax.Array
    boot_xy: jax.Array
    boot_xx: jax.Array
    boot_yy: jax.Array
    key: jax.Array
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
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_models_b is not None and num_models_a is None:
            raise ValueError("num_models_b needs num_models_a: population mode is set by num_models_a")
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
        if not isinstance(num_bootstrap, (int, np.integer)) or num_bootstrap < 0:
            raise ValueError(f"num_bootstrap must be a non-negative integer, got {num_bootstrap!r}")
        la, lb = num_layers_a, num_layers_a if num_layers_b is None else num_layers_b
        ma = 1 if num_models_a is None else num_models_a
        mb = ma if num_models_b is None else num_models_b
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
        zeros = lambda *shape: jnp.zeros(shape, dtype)
        return cls(xy=zeros(ma, mb, la, lb), xx=zeros(ma, la), yy=zeros(mb, lb),
                   count=jnp.zeros((), jnp.int32), boot_xy=zeros(num_bootstrap, ma, mb, la, lb),
                   boot_xx=zeros(num_bootstrap, ma, la), boot_yy=zeros(num_bootstrap, mb, lb),
                   key=jax.random.key_data(jax.random.key(seed)),
                   population=num_models_a is not None, kernel=kernel, threshold=float(threshold))

    @property
    def num_bootstrap(self) -> int:
        return self.boot_xy.shape[0]

    def _grams(self, items: list[tuple[str, jax.Array]], side: str) -> tuple[jax.Array, int]:
        models, layers = self.xy.shape[0::2] if side == "acts_a" else self.xy.shape[1::2]
        if len(items) != layers:
            raise ValueError(f"{side} has {len(items)} layers, the accumulator expects {layers}")
        n = _check_layers(items, models if self.population else None)
        return _ucentred_grams(items, self.population, self.kernel, self.threshold), n

    def _check_within(self, side: str) -> None:
        if self.xy.shape[0::2] != self.xy.shape[1::2]:
            raise ValueError(f"{side} is required: this accumulator compares two different models "
                             f"(heatmap shape {self.xy.shape})")

    def _batch_stats(self, items_a, items_b, weights: jax.Array):
        """HSIC₁ sums of one minibatch, and their bootstrap-weighted copies."""
        ga, n = self._grams(items_a, "acts_a")
        gb = None
        if items_b is None:
            self._check_within("acts_b")
        else:
            gb, nb = self._grams(items_b, "acts_b")
            if nb != n:
                raise ValueError(f"acts_a and acts_b need the same minibatch: {n} vs {nb} examples")
        return self._weighted(_batch_hsic(ga, gb), weights)

    def _bootstrap_weights(self, first: jax.Array, k: int) -> jax.Array:
        """Poisson(1) weights (k, B) of minibatches first .. first + k - 1, fixed by seed and index."""
        key = jax.random.wrap_key_data(self.key)
        draw = lambda i: jax.random.poisson(jax.random.fold_in(key, i), 1.0, (self.num_bootstrap,))
        return jax.vmap(draw)(first + jnp.arange(k)).astype(self.xy.dtype)

    def _weighted(self, stats, weights: jax.Array):
        """stats of one minibatch and their copies weighted by weights: (B,)."""
        stats = tuple(s.astype(self.xy.dtype) for s in stats)
        return stats + tuple(jnp.tensordot(weights, s, axes=0) for s in stats)

    def _add(self, sums, batches) -> "MinibatchCKA":
        xy, xx, yy, bxy, bxx, byy = sums
        return self.replace(xy=self.xy + xy, xx=self.xx + xx, yy=self.yy + yy, count=self.count + batches,
                            boot_xy=self.boot_xy + bxy, boot_xx=self.boot_xx + bxx, boot_yy=self.boot_yy + byy)

    def update(self, acts_a: Activations, acts_b: Activations | None = None) -> "MinibatchCKA":
        """Adds one minibatch. acts_*: list or ordered mapping of per-layer arrays (batch, ...),
        (models, batch, ...) in population mode; acts_b=None compares model a with itself."""
        items_b = None if acts_b is None else _named_layers(acts_b, "acts_b")
        weights = self._bootstrap_weights(self.count, 1)[0]
        return self._add(self._batch_stats(_named_layers(acts_a, "acts_a"), items_b, weights), 1)

    def update_grams(self, grams_a: jax.Array, grams_b: jax.Array | None = None) -> "MinibatchCKA":
        """Adds one minibatch from `minibatch_grams` outputs, (L, n, n) or (M, L, n, n)."""
        grams = []
        for name, g, (models, layers) in (("grams_a", grams_a, self.xy.shape[0::2]),
                                          ("grams_b", grams_b, self.xy.shape[1::2])):
            if g is None:
                continue
            expected = (models, layers) if self.population else (layers,)
            shape = jnp.shape(g)
            if len(shape) != len(expected) + 2 or shape[:-2] != expected or shape[-1] != shape[-2]:
                raise ValueError(f"{name} must have shape {expected + ('n', 'n')}, got {shape}")
            grams.append(jnp.asarray(g) if self.population else jnp.asarray(g)[None])
        if grams_b is None:
            self._check_within("grams_b")
            grams.append(None)
        elif grams[0].shape[-1] != grams[1].shape[-1]:
            raise ValueError(f"grams_a and grams_b need the same minibatch, got {jnp.shape(grams_a)} and "
                             f"{jnp.shape(grams_b)}")
        return self._add(self._weighted(_batch_hsic(*grams), self._bootstrap_weights(self.count, 1)[0]), 1)

    def update_sharded(self, acts_a: Activations, acts_b: Activations | None = None, *, mesh: Mesh,
                       axis_name: str = "batch") -> "MinibatchCKA":
        """Adds k minibatches spread over the devices of one mesh axis.

        acts_*: per-layer arrays with a leading minibatch axis, (k, batch, ...) or
        (k, models, batch, ...), k a multiple of the axis size. Each device accumulates its own
        minibatches; one psum combines the partial sums. Equals k calls of `update`.
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
            def body(sums, i):
                batch_a = [(name, a[i]) for name, a in zip(labels_a, arrays_a)]
                batch_b = None if labels_b is None else [(name, b[i]) for name, b in zip(labels_b, arrays_b)]
                stats = self._batch_stats(batch_a, batch_b, weights[i])
                return tuple(s + t for s, t in zip(sums, stats)), None

            zero = tuple(jnp.zeros_like(x) for x in (self.xy, self.xx, self.yy, self.boot_xy, self.boot_xx,
                                                      self.boot_yy))
            zero = jax.lax.pcast(zero, (axis_name,), to="varying")
            sums, _ = jax.lax.scan(body, zero, jnp.arange(weights.shape[0]))
            return jax.lax.psum(sums, axis_name)

        # Auto axes: the result is an ordinary replicated array, usable outside any mesh context.
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        specs = (P(axis_name),) * 3
        args = (self._bootstrap_weights(self.count, k), [a for _, a in items_a],
                [] if items_b is None else [a for _, a in items_b])
        args = jax.device_put(args, tuple(NamedSharding(mesh, spec) for spec in specs))
        sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
        return self._add(sharded(*args), k)

    def merge(self, other: "MinibatchCKA") -> "MinibatchCKA":
        """Sums of two accumulators of the same shape (other hosts, runs or devices)."""
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
        return self._add((other.xy, other.xx, other.yy, other.boot_xy, other.boot_xx, other.boot_yy), other.count)

    def _ratio(self, xy, xx, yy):
        out = xy / jnp.sqrt(xx[..., :, None, :, None] * yy[..., None, :, None, :])
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
        """Percentile bootstrap confidence interval over minibatches: (low, high), each like result()."""
        if not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1), got {level}")
        samples = self.bootstrap_samples()
        alpha = (1 - level) / 2
        return jnp.quantile(samples, alpha, axis=0), jnp.quantile(samples, 1 - alpha, axis=0)
