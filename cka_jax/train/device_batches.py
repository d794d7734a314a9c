"""The run's data on devices: one iterator of device batches per epoch, and the test set.

:func:`open_inputs` loads the configured data set and gives :class:`TrainInputs`, the same for
both kinds of data set (:attr:`~cka_jax.data.datasets.DatasetInfo.streamed`):

* held in memory (digits, CIFAR): the whole training set is put on every device once; each step
  is given all of it and picks, augments and normalises its own batch there (from its model's
  data key and step), so each model may see its own data order;
* streamed (ImageNet): each step's batch is decoded and augmented on the host, then transferred;
  every model sees the same batches.

Both give ``batches(start, stop)``, the ``(images, labels)`` on devices for steps
``[start, stop)``, and the train step that consumes them (:meth:`TrainInputs.make_train_step`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
import optax

from cka_jax.data import datasets as data
from cka_jax.models import ResNetTrunk
from cka_jax.train import population as pop
from cka_jax.train import step as training

logger = logging.getLogger(__name__)

# One padded test batch on the host: images (E, H, W, C) uint8, labels (E,), valid (E,) bool.
HostEvalBatch = tuple[np.ndarray, np.ndarray, np.ndarray]


class EvalSet:
    """The test set as fixed-shape padded batches: held on device, or streamed from host."""

    def __init__(
        self,
        host_batches: Callable[[], Iterable[HostEvalBatch]],
        num_examples: int,
        sharding: jax.sharding.NamedSharding,
        keep_on_device: bool,
    ):
        self.num_examples, self._sharding = num_examples, sharding
        self._host_batches = host_batches
        self._cached = list(self._transfer(host_batches())) if keep_on_device else None

    def _transfer(self, batches: Iterable[HostEvalBatch]):
        for images, labels, valid in batches:
            yield (tuple(pop.host_to_sharded(a, self._sharding) for a in (images, labels, valid)), labels[valid])

    def batches(self) -> Iterator[tuple[tuple[jax.Array, jax.Array, jax.Array], np.ndarray]]:
        """((images, labels, valid) on device, the batch's real labels on host) per batch."""
        return iter(self._cached) if self._cached is not None else self._transfer(self._host_batches())


def padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> list[HostEvalBatch]:
    """``images`` (N, H, W, C) and ``labels`` (N,) in batches of min(batch_size, N), the last one
    padded with zeros (``valid`` False)."""
    n = len(labels)
    batch_size = min(batch_size, n)
    padded = -(-n // batch_size) * batch_size
    pad = padded - n
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    valid = np.arange(padded) < n
    return [
        (images[i : i + batch_size], labels[i : i + batch_size], valid[i : i + batch_size])
        for i in range(0, padded, batch_size)
    ]


class TrainInputs:
    """A data set on the devices of a run: its training batches, test set and normalisation.

    Attributes:
      num_train: training examples (after ``data.fraction``).
      batch_size: examples per step and model (``train.batch_size``, at most ``num_train``).
      steps_per_epoch: ``num_train // batch_size`` (the last partial batch is dropped).
      mean, std: (C,) normalisation on every device.
      eval_set: the test set.
    """

    def __init__(self, config: ml_collections.ConfigDict, num_train: int, mean, std, eval_set: EvalSet, replicated):
        self.config, self.num_train, self.eval_set = config, num_train, eval_set
        self.batch_size = min(config.train.batch_size, num_train)
        if self.batch_size < config.train.batch_size:
            logger.warning(
                "training set of %d examples is smaller than train.batch_size=%d; using batches of %d",
                num_train,
                config.train.batch_size,
                self.batch_size,
            )
        self.steps_per_epoch = num_train // self.batch_size
        self.num_classes = data.dataset(config.data.name).num_classes
        self.replicated = replicated
        self.mean, self.std = (pop.host_to_sharded(np.asarray(a, np.float32), replicated) for a in (mean, std))

    def make_train_step(self, model: ResNetTrunk, tx: optax.GradientTransformation) -> Callable:
        """``step(state, images, labels, mean, std) -> state`` of one model on these batches."""
        raise NotImplementedError

    def batches(self, start: int, stop: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        """(images, labels) on every device for each of steps ``[start, stop)``."""
        raise NotImplementedError


class InMemoryInputs(TrainInputs):
    """A data set held on every device; each step gathers and augments its own batch there."""

    def __init__(self, config: ml_collections.ConfigDict, replicated):
        d = config.data
        arrays = data.load_in_memory(d.name, d.fraction, d.seed, d.random_labels, d.data_dir or None)
        eval_batches = padded_batches(arrays.test_images, arrays.test_labels, config.train.eval_batch_size)
        eval_set = EvalSet(lambda: eval_batches, len(arrays.test_labels), replicated, keep_on_device=True)
        super().__init__(config, len(arrays.train_labels), arrays.mean, arrays.std, eval_set, replicated)
        self._train = (
            pop.host_to_sharded(arrays.train_images, replicated),
            pop.host_to_sharded(arrays.train_labels, replicated),
        )

    def make_train_step(self, model: ResNetTrunk, tx: optax.GradientTransformation) -> Callable:
        return training.make_in_memory_train_step(
            model, tx, self.config, self.num_classes, self.num_train, self.batch_size
        )

    def batches(self, start: int, stop: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        return itertools.repeat(self._train, stop - start)  # the whole set: the step picks its batch


class StreamedInputs(TrainInputs):
    """A data set decoded and augmented on the host (grain), one shared batch per step."""

    def __init__(self, config: ml_collections.ConfigDict, replicated):
        from cka_jax.train import imagenet_stream  # grain and PIL only where needed

        self._source = imagenet_stream.ImageNetStream(config)
        eval_set = EvalSet(
            lambda: self._source.test_batches(config.train.eval_batch_size),
            self._source.num_test,
            replicated,
            keep_on_device=False,
        )
        super().__init__(config, self._source.num_train, self._source.mean, self._source.std, eval_set, replicated)
        self._host_batches: Iterator[tuple[np.ndarray, np.ndarray]] | None = None
        self._next_step = -1  # the step of the next batch of _host_batches

    def make_train_step(self, model: ResNetTrunk, tx: optax.GradientTransformation) -> Callable:
        return training.make_streamed_train_step(model, tx, self.config, self.num_classes, self.steps_per_epoch)

    def batches(self, start: int, stop: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        # One host pipeline for the whole run, opened again only where a call does not go on
        # from the previous one (the first call, a resume).
        if self._host_batches is None or start != self._next_step:
            self._host_batches = self._source.train_batches(start, self.batch_size)
        for step in range(start, stop):
            self._next_step = step + 1
            images, labels = next(self._host_batches)
            yield pop.host_to_sharded(images, self.replicated), pop.host_to_sharded(labels, self.replicated)


def open_inputs(config: ml_collections.ConfigDict, replicated: jax.sharding.Sharding) -> TrainInputs:
    """The configured data set, loaded (or opened) and put on the devices of ``replicated``."""
    if data.dataset(config.data.name).streamed:
        return StreamedInputs(config, replicated)
    return InMemoryInputs(config, replicated)
