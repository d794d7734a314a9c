"""Laying a population of M models out on devices and mapping per-model functions over it.

A population state is any pytree whose leaves carry the model index on axis 0 ("stacked").
It is padded to a multiple of the device count D and sharded over a 1-D mesh axis ``'pop'``,
so each device holds ``per_device = M_pad / D`` models. Inside a device the models run
either all at once (``vmap``: one step, per-model kernels become grouped convolutions) or one
per call (``loop``: the single-model step, called once per local model slot). To keep one
code path, the state is split into *chunks*: chunk k holds, on every device, that device's
local models ``[k*c, (k+1)*c)``, where ``c = models_per_call`` (``per_device`` for vmap, 1 for
loop). Each chunk is itself a stacked pytree sharded over ``'pop'``, and one compiled function
steps every chunk. Model m always computes the same numbers wherever it is laid out.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "pop"
PyTree = Any

# On XLA:CPU (2 cores, ResNet-14 1x, batch 128) vmap over M models runs at 0.54x (M=8, 8x8x1)
# down to 0.24x (M=8, 32x32x3) of the per-model throughput of a loop of single-model steps, so
# CPU loops. On GPU, vmap's grouped-convolution backward pass is slow in XLA (jax-ml/jax#13800)
# so GPU loops too; TPU runs grouped convolutions natively and is launch-bound on small steps,
# so it vmaps. benchmarks/population_throughput.py measures this on the machine at hand.
AUTO_STRATEGY = {"cpu": "loop", "gpu": "loop", "cuda": "loop", "rocm": "loop", "tpu": "vmap"}


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
    """``'vmap'`` or ``'loop'``; ``'auto'`` picks per backend (see :data:`AUTO_STRATEGY`)."""
    if strategy in ("vmap", "loop"):
        return strategy
    if strategy != "auto":
        raise ValueError(f"population.strategy must be auto, vmap or loop, got '{strategy}'")
    return AUTO_STRATEGY.get(backend or jax.default_backend(), "loop")


@dataclasses.dataclass(frozen=True)
class PopulationLayout:
    """Where each of ``size`` models lives: ``padded_size`` slots over a 1-D device mesh."""
    size: int
    mesh: jax.sharding.Mesh
    strategy: str  # 'vmap' | 'loop' (resolved)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def padded_size(self) -> int:
        return -(-self.size // self.num_devices) * self.num_devices

    @property
    def per_device(self) -> int:
        return self.padded_size // self.num_devices

    @property
    def models_per_call(self) -> int:
        return self.per_device if self.strategy == "vmap" else 1

    @property
    def num_chunks(self) -> int:
        return self.per_device // self.models_per_call

    @property
    def sharded(self) -> NamedSharding:
        """Axis 0 split over the population axis."""
        return NamedSharding(self.mesh, P(AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def chunk_models(self, k: int) -> np.ndarray:
        """Model indices held by chunk ``k``, in the chunk's axis-0 order."""
        c, per = self.models_per_call, self.per_device
        return np.concatenate([np.arange(d * per + k * c, d * per + (k + 1) * c)
                               for d in range(self.num_devices)])


def make_layout(size: int, strategy: str = "auto",
                devices: Sequence[jax.Device] | None = None) -> PopulationLayout:
    """Lay ``size`` models over ``devices`` (default: every device of every host).

    Raises ``ValueError`` when the population cannot be laid out (size < 1, no devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    if size < 1:
        raise ValueError(f"a population needs at least one model, got size={size}")
    if not devices:
        raise ValueError("no devices to lay the population out on")
    backend = devices[0].platform
    mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)
    return PopulationLayout(size, mesh, resolve_strategy(strategy, backend))


def host_to_sharded(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from an identical host array on every process (works multi-host)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(tree: PyTree) -> PyTree:
    """Fetch a (possibly multi-host) global pytree as numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def _per_model(fn: Callable, models_per_call: int) -> Callable:
    """``fn(model, *shared)`` → function of a stacked ``(c, ...)`` local chunk."""
    if models_per_call == 1:  # the single-model computation itself, no batching rule involved
        def apply(models, *shared):
            out = fn(jax.tree.map(lambda x: x[0], models), *shared)
            return jax.tree.map(lambda x: x[None], out)
        return apply

    def apply_vmapped(models, *shared):
        return jax.vmap(lambda model: fn(model, *shared))(models)
    return apply_vmapped


def map_models(fn: Callable, layout: PopulationLayout, donate: bool = False) -> Callable:
    """Compile ``fn(model, *shared) -> per-model pytree`` over one chunk of the population.

    The returned function takes a chunk (stacked pytree sharded over ``'pop'``) and shared
    arguments (replicated on every device) and returns the per-model outputs stacked and
    sharded like the chunk. One compilation serves every chunk.
    """
    local = _per_model(fn, layout.models_per_call)

    def sharded(chunk, *shared):
        mapped = jax.shard_map(
            local, mesh=layout.mesh,
            in_specs=(P(AXIS),) + (P(),) * len(shared), out_specs=P(AXIS))
        return mapped(chunk, *shared)

    return jax.jit(sharded, donate_argnums=(0,) if donate else ())


def split_chunks(stacked: PyTree, layout: PopulationLayout) -> list[PyTree]:
    """Padded stacked population ``(M_pad, ...)`` → ``num_chunks`` chunks ``(D*c, ...)``."""
    if layout.num_chunks == 1:
        return [stacked]
    d, n, c = layout.num_devices, layout.num_chunks, layout.models_per_call

    @functools.partial(jax.jit, out_shardings=layout.sharded)
    def take(tree, k):
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(
            x.reshape((d, n, c) + x.shape[1:]), k, axis=1, keepdims=False
        ).reshape((d * c,) + x.shape[1:]), tree)

    return [take(stacked, k) for k in range(n)]


def merge_chunks(chunks: Sequence[PyTree], layout: PopulationLayout) -> PyTree:
    """Inverse of :func:`split_chunks`: chunks → stacked ``(M_pad, ...)`` in model order."""
    if len(chunks) == 1:
        return chunks[0]
    d, c = layout.num_devices, layout.models_per_call

    @functools.partial(jax.jit, out_shardings=layout.sharded)
    def merge(chunk_list):
        return jax.tree.map(lambda *xs: jnp.stack(
            [x.reshape((d, c) + x.shape[1:]) for x in xs], axis=1
        ).reshape((-1,) + xs[0].shape[1:]), *chunk_list)

    return merge(list(chunks))


def model_keys(seed: int, num_models: int) -> np.ndarray:
    """(num_models, 2) uint32 raw PRNG keys; model m's depends only on (seed, m)."""
    base = jax.random.PRNGKey(seed)
    return np.asarray(jax.vmap(lambda m: jax.random.fold_in(base, m))(jnp.arange(num_models)))
