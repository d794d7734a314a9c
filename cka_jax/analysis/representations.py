"""Layer representations of a population on test minibatches, jitted and vmapped over the models.

Images are normalised inside the compiled function, so the host only ships uint8 batches.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax.data import datasets as data_lib
from cka_jax.models import CaptureSpec, ResNetTrunk

if TYPE_CHECKING:
    from cka_jax.analysis.inputs import TestSet, TrainedPopulation

T = TypeVar("T")


class ProgressFactory(Protocol):
    """Makes a progress bar from an iterable: progress(items, desc="...", leave=False) yields the
    items while showing how far it has got (`tqdm.tqdm` is one; `no_progress` shows nothing)."""

    def __call__(self, iterable: Iterable[T], /, **options: Any) -> Iterable[T]: ...


def no_progress(iterable: Iterable[T], /, **_: Any) -> Iterable[T]:
    """A progress factory that shows nothing (pass `tqdm.tqdm` to see bars)."""
    return iterable


def even_batches(num_examples: int, batch_size: int) -> int:
    """The largest size <= batch_size splitting num_examples into equal batches with the fewest
    examples left over: n // ceil(n / batch_size) (CKA minibatches must share one shape)."""
    if num_examples < 4:
        raise ValueError(f"need at least 4 test examples, got {num_examples}")
    return num_examples // -(-num_examples // min(batch_size, num_examples))


def batch_indices(num_examples: int, batch_size: int, passes: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Index arrays of equal-size minibatches (see `even_batches`); pass 0 in order, later passes
    shuffled with `seed` (the paper averages minibatch CKA over 10 shuffled passes)."""
    size = even_batches(num_examples, batch_size)
    out: list[np.ndarray] = []
    for p in range(passes):
        order = np.arange(num_examples) if p == 0 else np.random.default_rng([seed, p]).permutation(num_examples)
        out.extend(order[i : i + size] for i in range(0, num_examples - size + 1, size))
    return out


def _apply(model: ResNetTrunk, dtype: str, capture: CaptureSpec | None, skip_blocks: tuple[str, ...]) -> Callable:
    def one(variables, images, mean, std):
        x = data_lib.normalize(images, mean, std, jnp.dtype(dtype))
        if capture is None:
            return model.apply(variables, x, skip_blocks=skip_blocks), OrderedDict()
        return model.apply(variables, x, capture=capture, skip_blocks=skip_blocks)

    return jax.vmap(one, (0, None, None, None))


def apply_fn(
    population: TrainedPopulation, capture: CaptureSpec | None = None, skip_blocks: tuple[str, ...] = ()
) -> Callable:
    """`f(variables, images uint8 (B, H, W, C), mean, std) -> (logits (M, B, C), reps)` for the
    stacked population, reps an OrderedDict name -> (M, B, ...); not jitted (compose, then jit)."""
    return _apply(population.model, population.config.model.dtype, capture, tuple(skip_blocks))


@functools.lru_cache(maxsize=64)
def _jitted_apply(
    model: ResNetTrunk, dtype: str, capture: CaptureSpec | None, skip_blocks: tuple[str, ...]
) -> Callable:
    return jax.jit(_apply(model, dtype, capture, skip_blocks))


def jitted_apply_fn(
    population: TrainedPopulation, capture: CaptureSpec | None = None, skip_blocks: tuple[str, ...] = ()
) -> Callable:
    """`apply_fn` jitted, one compiled function per architecture, capture and deletion (checkpoints
    and populations of the same architecture share it)."""
    return _jitted_apply(population.model, population.config.model.dtype, capture, tuple(skip_blocks))


def pooled(value: np.ndarray) -> np.ndarray:
    """Spatial average of a convolutional representation (..., n, H, W, C) -> (..., n, C)."""
    return value.mean(axis=(-3, -2)) if value.ndim >= 4 else value


def collect(
    population: TrainedPopulation,
    images: np.ndarray,
    test: TestSet,
    capture: CaptureSpec,
    pool: bool = False,
    batch_size: int = 256,
    progress: ProgressFactory = no_progress,
) -> OrderedDict[str, np.ndarray]:
    """Representations of `images` (n, H, W, C) uint8: name -> (M, n, ...) float32, spatially
    averaged to (M, n, C) when `pool`."""
    chunks = [np.arange(i, min(i + batch_size, len(images))) for i in range(0, len(images), batch_size)]
    fn = jitted_apply_fn(population, capture)
    parts: OrderedDict[str, list[np.ndarray]] = OrderedDict()
    for idx in progress(chunks, desc="representations", leave=False):
        reps = jax.device_get(fn(population.variables, images[idx], test.mean, test.std)[1])
        for name, value in reps.items():
            value = np.asarray(value, np.float32)
            parts.setdefault(name, []).append(pooled(value) if pool else value)
    return OrderedDict((name, np.concatenate(v, axis=1)) for name, v in parts.items())


def test_logits(
    population: TrainedPopulation, test: TestSet, skip_blocks: tuple[str, ...] = (), batch_size: int = 500
) -> np.ndarray:
    """Logits (M, N, C) of every model on the whole test set, with `skip_blocks` deleted."""
    fn = jitted_apply_fn(population, None, skip_blocks)
    n = len(test.labels)
    out = [
        np.asarray(fn(population.variables, test.in_memory_images()[i : i + batch_size], test.mean, test.std)[0])
        for i in range(0, n, batch_size)
    ]
    return np.concatenate(out, axis=1)
