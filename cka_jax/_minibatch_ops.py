"""MinibatchCKA's compiled operations: pure functions of the accumulator (a pytree) and the arrays.

Module-level jit caches one program per input shapes, so an eager loop of `MinibatchCKA.update`
compiles once; inside a caller's jit or vmap they are inlined.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cka_jax._checks import to_float
from cka_jax._hsic_sums import Scales, Totals, batch_hsic, cka_ratio, combine, weighted
from cka_jax._layer_grams import LayerInputs, batch_totals, fit_grams, upper
from cka_jax._permutations import null_sums, replicate_keys
from cka_jax._sharded_sums import sharded_totals

# A cka_jax.MinibatchCKA: its methods check their arguments and call these functions (importing it
# here would make the two modules import each other).
MinibatchCKA = Any


def plus(acc: MinibatchCKA, totals: Totals, batches: jax.Array | int) -> MinibatchCKA:
    """`acc` plus `totals` (sums from the same kind of accumulator) of `batches` more minibatches;
    sums at different log2 scales are rescaled exactly."""
    (xy, xx, yy), (boot_xy, boot_xx, boot_yy), (scale_a, scale_b), null_xy = combine(acc.totals, totals)
    return dataclasses.replace(
        acc,
        xy=xy,
        xx=xx,
        yy=yy,
        count=acc.count + batches,
        boot_xy=boot_xy,
        boot_xx=boot_xx,
        boot_yy=boot_yy,
        log2_scale_a=scale_a,
        log2_scale_b=scale_b,
        null_xy=null_xy,
    )


def bootstrap_weights(acc: MinibatchCKA, k: int) -> jax.Array:
    """(k, B) Exponential(1) weights of `acc`'s next k minibatches, fixed by its seed and the
    minibatch index (so merged and sharded runs draw the same ones); none drawn for B = 0."""
    if not acc.num_bootstrap:
        return jnp.zeros((k, 0), acc.xy.dtype)
    key = jax.random.wrap_key_data(acc.key)

    def draw(i: jax.Array) -> jax.Array:
        return jax.random.exponential(jax.random.fold_in(key, i), (acc.num_bootstrap,), acc.xy.dtype)

    return jax.vmap(draw)(acc.count + jnp.arange(k))


def null_keys(acc: MinibatchCKA, k: int | None = None) -> jax.Array | None:
    """Raw keys (k, P, ...) of `acc`'s next k minibatches' null replicates ((P, ...) for k None),
    or None without replicates."""
    keys = replicate_keys(acc.key, acc.count + jnp.arange(k or 1), acc.num_permutations)
    return keys if keys is None or k else keys[0]


@partial(jax.jit, static_argnames=("b_is_a", "modes"))
def update(
    acc: MinibatchCKA,
    side_a: LayerInputs,
    side_b: LayerInputs | None,
    b_is_a: bool,
    modes: tuple[tuple[str, ...] | None, tuple[str, ...] | None],
) -> MinibatchCKA:
    weights, keys = bootstrap_weights(acc, 1)[0], null_keys(acc)
    totals = batch_totals(acc.gram_kind, side_a, side_b, b_is_a, weights, acc.totals.scales, acc.xy.dtype, modes, keys)
    return plus(acc, totals, 1)


@jax.jit
def update_grams(acc: MinibatchCKA, grams_a: jax.Array, grams_b: jax.Array | None) -> MinibatchCKA:
    def fitted(grams: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
        grams = to_float(grams)
        return fit_grams(upper(grams if acc.population else grams[None]), scale)

    scales = acc.totals.scales
    ga, scale_a = fitted(grams_a, scales.a)
    gb, scale_b = (None, scale_a) if grams_b is None else fitted(grams_b, scales.b)
    weights, null = bootstrap_weights(acc, 1)[0], null_sums(ga, gb, null_keys(acc))
    return plus(acc, weighted(batch_hsic(ga, gb), weights, Scales(scale_a, scale_b), acc.xy.dtype, null), 1)


@partial(jax.jit, static_argnames=("b_is_a", "mesh", "axis_name"))
def update_sharded(
    acc: MinibatchCKA,
    arrays_a: list[jax.Array],
    arrays_b: list[jax.Array] | None,
    b_is_a: bool,
    mesh: Mesh,
    axis_name: str,
) -> MinibatchCKA:
    k = arrays_a[0].shape[0]
    weights, keys = bootstrap_weights(acc, k), null_keys(acc, k)
    totals = sharded_totals(acc.gram_kind, acc.totals, weights, keys, arrays_a, arrays_b, b_is_a, mesh, axis_name)
    return plus(acc, totals, k)


@jax.jit
def merge(acc: MinibatchCKA, other: MinibatchCKA) -> MinibatchCKA:
    return plus(acc, other.totals, other.count)


@jax.jit
def result(acc: MinibatchCKA) -> jax.Array:
    return cka_ratio(acc.totals.sums, acc.population)


@jax.jit
def bootstrap_samples(acc: MinibatchCKA) -> jax.Array:
    return cka_ratio(acc.totals.boot, acc.population)


@partial(jax.jit, static_argnames="level")
def bootstrap_interval(acc: MinibatchCKA, level: float) -> tuple[jax.Array, jax.Array]:
    samples = cka_ratio(acc.totals.boot, acc.population)
    alpha = (1 - level) / 2
    enough = acc.count >= 2
    low, high = (jnp.where(enough, jnp.quantile(samples, q, axis=0), jnp.nan) for q in (alpha, 1 - alpha))
    return low, high
