"""Minibatch HSIC₁ sums over the devices of one mesh axis (traced code for
`MinibatchCKA.update_sharded`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cka_jax._hsic_sums import NO_SCALE, Scales, Totals, agree, combine
from cka_jax._layer_grams import GramKind, LayerInputs, batch_totals


def _empty(like: Totals) -> Totals:
    """Zero sums shaped like `like`, with every layer's scale unset (NO_SCALE). Built from shapes
    only: `zeros_like` would carry over the sharding `like` has when a jitted sharded update
    receives the output of an earlier one, which shard_map's manual mesh refuses."""
    sums, boot, null = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (like.sums, like.boot, like.null))
    return Totals(sums, boot, Scales(*(jnp.full(s.shape, NO_SCALE, s.dtype) for s in like.scales)), null)


def sharded_totals(
    kind: GramKind,
    like: Totals,
    weights: jax.Array,
    keys: jax.Array | None,
    arrays_a: list[jax.Array],
    arrays_b: list[jax.Array] | None,
    b_is_a: bool,
    mesh: Mesh,
    axis_name: str,
) -> Totals:
    """Totals of k minibatches stacked on axis 0 of every layer (k, ...), k / devices of them on
    each device of mesh axis `axis_name`; weights: (k, B) bootstrap weights; keys: (k, P, ...) raw
    keys of the null replicates. Arguments of
    `batch_totals`; `like`: totals whose shapes and dtypes the result takes.

    Each device scans its own minibatches with its own log2 scales; the devices then agree on the
    largest scales (one pmax), rescale their sums exactly and one psum combines them.
    """
    within = arrays_b is None

    def local(
        weights: jax.Array, keys: jax.Array | None, arrays_a: list[jax.Array], arrays_b: list[jax.Array]
    ) -> Totals:
        def body(carry: Totals, i: jax.Array) -> tuple[Totals, None]:
            batch_b = None if within else LayerInputs([b[i] for b in arrays_b])
            batch = batch_totals(
                kind,
                LayerInputs([a[i] for a in arrays_a]),
                batch_b,
                b_is_a,
                weights[i],
                carry.scales,
                like.sums.xy.dtype,
                keys=None if keys is None else keys[i],
            )
            return combine(carry, batch), None

        start = jax.lax.pcast(_empty(like), (axis_name,), to="varying")
        totals, _ = jax.lax.scan(body, start, jnp.arange(weights.shape[0]))
        return agree(totals, axis_name)

    specs = (P(axis_name),) * 4
    args = (weights, keys, arrays_a, [] if arrays_b is None else arrays_b)
    args = jax.device_put(args, tuple(NamedSharding(mesh, spec) for spec in specs))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)
