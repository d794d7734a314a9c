"""Laying a population of M models out on devices and mapping per-model functions over it.

A population state is any pytree whose leaves carry the model index on axis 0 ("stacked").
It is padded to a multiple of the device count D and sharded over a 1-D mesh axis ``'pop'``,
so each device holds ``per_device = M_pad / D`` models. Inside a device the models run
``c = models_per_call`` at a time: c models in one call are vmapped (per-model kernels become
grouped convolutions), c = 1 calls the single-model step itself. ``population.strategy`` names c:
``loop`` is 1, ``vmap`` is ``per_device``, an integer is itself (a divisor of ``per_device``), and
``auto`` is measured (:mod:`cka_jax.train.strategy_tuning`). The state is split into *chunks*:
chunk k holds, on every device, that device's local models ``[k*c, (k+1)*c)``. Each chunk is
itself a stacked pytree sharded over ``'pop'``, and one compiled function steps every chunk.
Model m always computes the same numbers wherever it is laid out.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cka_jax._owned import owned_copy
from cka_jax.workdir.config import STRATEGY_NAMES, Strategy

AXIS = "pop"
PyTree = Any

# Where `auto` starts measuring, and its choice when it measures nothing else (a run too short
# for the budget to hold a second compilation, a single candidate). On CPU one model per call
# keeps the single-model throughput, while every vmapped convolution becomes a grouped one, which
# XLA:CPU runs far slower (benchmarks/README.md, population training throughput). On GPU vmap's
# grouped-convolution backward pass is slow in XLA (jax-ml/jax#13800); TPU runs grouped
# convolutions natively and is launch-bound on small steps: guesses that `auto` corrects by measuring.
AUTO_STRATEGY = {"cpu": "loop", "gpu": "loop", "cuda": "loop", "rocm": "loop", "tpu": "vmap"}


def chunk_sizes(per_device: int) -> list[int]:
    """Every valid ``models_per_call`` for ``per_device`` models per device: its divisors."""
    return [c for c in range(1, per_device + 1) if per_device % c == 0]


def strategy_chunk_size(strategy: Strategy, per_device: int, backend: str) -> int:
    """The chunk size ``strategy`` asks for; ``auto`` gives the :data:`AUTO_STRATEGY` fallback
    of ``backend`` (measuring is :mod:`~cka_jax.train.strategy_tuning`'s). ``ValueError`` (one
    line, naming the valid values) for a chunk size that does not divide ``per_device``."""
    name = AUTO_STRATEGY.get(backend, "loop") if strategy.name == "auto" else strategy.name
    if name in ("loop", "vmap"):
        return 1 if name == "loop" else per_device
    if per_device % strategy.chunk_size:
        valid = ", ".join([*STRATEGY_NAMES, *map(str, chunk_sizes(per_device))])
        raise ValueError(
            f"population.strategy='{strategy}' does not divide the {per_device} models each device "
            f"holds: use one of {valid}"
        )
    return strategy.chunk_size


@dataclasses.dataclass(frozen=True)
class PopulationLayout:
    """Where each of ``size`` models lives: ``padded_size`` slots over a 1-D device mesh, stepped
    ``models_per_call`` per device at a time."""

    size: int
    mesh: jax.sharding.Mesh
    models_per_call: int  # c, a divisor of per_device
    measured: bool = False  # population.strategy=auto: c is to be measured (the fallback until then)

    def __post_init__(self):
        if self.models_per_call < 1 or self.per_device % self.models_per_call:
            raise ValueError(f"models_per_call={self.models_per_call} must divide per_device={self.per_device}")

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
    def strategy(self) -> str:
        """``'loop'`` (c = 1), ``'vmap'`` (c = per_device > 1) or c in decimal: a value of
        ``population.strategy`` that gives this layout."""
        if self.models_per_call == 1:
            return "loop"
        return "vmap" if self.models_per_call == self.per_device else str(self.models_per_call)

    def with_models_per_call(self, models_per_call: int) -> PopulationLayout:
        """The same models on the same devices, stepped ``models_per_call`` at a time."""
        return dataclasses.replace(self, models_per_call=models_per_call)

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
        return np.concatenate([np.arange(d * per + k * c, d * per + (k + 1) * c) for d in range(self.num_devices)])


def make_layout(
    size: int, strategy: Strategy | str = "auto", devices: Sequence[jax.Device] | None = None
) -> PopulationLayout:
    """Lay ``size`` models over ``devices`` (default: every device of every host), stepped as
    ``strategy`` asks (:func:`strategy_chunk_size`; ``auto`` gives the fallback, to be measured; a
    string is read with :meth:`Strategy.parse`).

    Raises ``ValueError`` when the population cannot be laid out (size < 1, no devices, a
    strategy that is not one or does not divide the models per device).
    """
    devices = list(jax.devices() if devices is None else devices)
    if size < 1:
        raise ValueError(f"a population needs at least one model, got size={size}")
    if not devices:
        raise ValueError("no devices to lay the population out on")
    mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    per_device = -(-size // len(devices))
    strategy = Strategy.parse(strategy) if isinstance(strategy, str) else strategy
    models_per_call = strategy_chunk_size(strategy, per_device, devices[0].platform)
    return PopulationLayout(size, mesh, models_per_call, measured=strategy.name == "auto")


def host_to_sharded(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from an identical host array on every process (works multi-host), holding
    its own copy: JAX on CPU may otherwise keep reading the host buffer, which a data loader may
    refill for the next batch."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: owned_copy(array[index]))


def to_host(tree: PyTree) -> PyTree:
    """Fetch a (possibly multi-host) global pytree as numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def failed_exchange(error: BaseException) -> BaseException | None:
    """With several processes: the error, in ``error`` or what it was raised from or while
    handling (``__cause__``, ``__context__``, down the chain), with which an exchange with the
    other processes failed (a ``jax.errors.JaxRuntimeError``: a collective or the coordination
    service; another process died), e.g. under a checkpoint write that it made fail; also an
    error that only repeats a gloo collective's failure in its message. None if there is none,
    or with one process."""
    if jax.process_count() == 1:
        return None
    seen: set[int] = set()
    chain: list[BaseException | None] = [error]
    while chain:
        link = chain.pop(0)
        if link is None or id(link) in seen:
            continue
        if isinstance(link, jax.errors.JaxRuntimeError) or "Gloo" in str(link):
            return link
        seen.add(id(link))
        chain += [link.__cause__, link.__context__]
    return None


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


def map_models(fn: Callable, layout: PopulationLayout, donate: bool = False) -> jax.stages.Wrapped:
    """Compile ``fn(model, *shared) -> per-model pytree`` over one chunk of the population.

    The returned function takes a chunk (stacked pytree sharded over ``'pop'``) and shared
    arguments (replicated on every device) and returns the per-model outputs stacked and
    sharded like the chunk. One compilation serves every chunk.
    """
    local = _per_model(fn, layout.models_per_call)

    def sharded(chunk, *shared):
        mapped = jax.shard_map(local, mesh=layout.mesh, in_specs=(P(AXIS),) + (P(),) * len(shared), out_specs=P(AXIS))
        return mapped(chunk, *shared)

    return jax.jit(sharded, donate_argnums=(0,) if donate else ())


@functools.partial(jax.jit, static_argnums=(2,))
def _take_chunk(stacked: PyTree, k: jax.Array, layout: PopulationLayout) -> PyTree:
    """Chunk ``k`` of a stacked population: on every device, its local slots ``[k*c, (k+1)*c)``."""
    c = layout.models_per_call

    def local(tree, k):
        return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, k * c, c, axis=0), tree)

    return jax.shard_map(local, mesh=layout.mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS))(stacked, k)


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _put_chunk(stacked: PyTree, chunk: PyTree, k: jax.Array, layout: PopulationLayout) -> PyTree:
    """``stacked`` with chunk ``k`` written into its slots, in place (``stacked`` is donated)."""
    c = layout.models_per_call

    def local(tree, part, k):
        return jax.tree.map(lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, k * c, axis=0), tree, part)

    return jax.shard_map(local, mesh=layout.mesh, in_specs=(P(AXIS), P(AXIS), P()), out_specs=P(AXIS))(
        stacked, chunk, k
    )


def split_chunks(stacked: PyTree, layout: PopulationLayout) -> list[PyTree]:
    """Padded stacked population ``(M_pad, ...)`` → ``num_chunks`` chunks ``(D*c, ...)``."""
    if layout.num_chunks == 1:
        return [stacked]
    return [_take_chunk(stacked, np.int32(k), layout) for k in range(layout.num_chunks)]


def merge_chunks(chunks: Sequence[PyTree], layout: PopulationLayout) -> PyTree:
    """Inverse of :func:`split_chunks`: chunks → stacked ``(M_pad, ...)`` in model order.

    Chunk by chunk into one stacked buffer, with one compiled program for every chunk and every
    call. Stacking all chunks in one program compiled a program with M x (leaves) inputs on each
    checkpoint: its compilation took 3.4 GB at M = 200 (digits, ResNet-8, 1 CPU device) and the
    OOM killer at M = 1000.
    """
    if len(chunks) == 1:
        return chunks[0]
    stacked = _zeros_stacked(chunks[0], layout)
    for k, chunk in enumerate(chunks):
        stacked = _put_chunk(stacked, chunk, np.int32(k), layout)
    return stacked


@functools.partial(jax.jit, static_argnums=(1,))
def _zeros_stacked(chunk: PyTree, layout: PopulationLayout) -> PyTree:
    """Zeros shaped and sharded like the stacked population of which ``chunk`` is a chunk."""

    def local(part):
        return jax.tree.map(lambda x: jnp.zeros((layout.per_device,) + x.shape[1:], x.dtype), part)

    return jax.shard_map(local, mesh=layout.mesh, in_specs=P(AXIS), out_specs=P(AXIS))(chunk)


# Copies of the population's state that are alive at once: the chunks and the stacked copy a
# checkpoint assembles (on the devices), orbax's host copy of that and its serialization buffers
# (in host memory); benchmarks/README.md gives the peak memory this was read from.
DEVICE_COPIES, HOST_COPIES = 2, 2


def host_available_bytes() -> int | None:
    """Memory the host can still give: MemAvailable of /proc/meminfo, capped by the cgroup (v2)
    limit of a container; None where neither can be read."""
    available = []
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available.append(int(fields["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                available.append(int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    return min(available) if available else None


def _device_free_bytes(device: jax.Device) -> int | None:
    """Free memory of an accelerator (``memory_stats``); None on CPU, which uses host memory."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.1f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.0f} MB"


def check_memory(layout: PopulationLayout, model_bytes: int, chunk_activation_bytes: int) -> None:
    """``ValueError`` (one line) when the population cannot fit in memory.

    ``model_bytes``: one model's training state; ``chunk_activation_bytes``: what one call of a
    step over one chunk needs besides (activations and their gradients). Each device holds
    :data:`DEVICE_COPIES` copies of its models' state plus one chunk's activations; the host
    :data:`HOST_COPIES` of the models of its devices while a checkpoint is written. CPU devices
    use the host's memory, so their need is added to the host's.
    """
    local = [d for d in layout.mesh.devices.flat if d.process_index == jax.process_index()]
    per_device = layout.per_device * model_bytes * DEVICE_COPIES + chunk_activation_bytes
    device_free = [_device_free_bytes(d) for d in local]
    for device, free in zip(local, device_free, strict=True):
        if free is not None and free < per_device:
            raise ValueError(
                f"population.size={layout.size} needs about {_size(per_device)} on each device "
                f"({DEVICE_COPIES} copies of {model_bytes / 1e6:.2f} MB of training state for each "
                f"of its {layout.per_device} models, plus {_size(chunk_activation_bytes)} of "
                f"activations), but {device} has {_size(free)} free: use a smaller "
                "population.size or more devices"
            )
    slots = len(local) * layout.per_device
    copies, activations = HOST_COPIES, 0
    if all(free is None for free in device_free):  # CPU devices
        copies, activations = HOST_COPIES + DEVICE_COPIES, len(local) * chunk_activation_bytes
    host = slots * model_bytes * copies + activations
    available = host_available_bytes()
    if available is not None and host > available:
        raise ValueError(
            f"population.size={layout.size} needs about {_size(host)} of memory ({copies} copies "
            f"of {model_bytes / 1e6:.2f} MB of training state for each of {slots} model slots, "
            f"plus {_size(activations)} of activations), but {_size(available)} are available: "
            "use a smaller population.size or a smaller model"
        )


def model_keys(seed: int, num_models: int) -> np.ndarray:
    """(num_models, 2) uint32 raw PRNG keys; model m's depends only on (seed, m)."""
    base = jax.random.PRNGKey(seed)
    return np.asarray(jax.vmap(lambda m: jax.random.fold_in(base, m))(jnp.arange(num_models)))
