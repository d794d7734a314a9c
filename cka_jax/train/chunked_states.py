"""The population's training states on devices, in chunks, with the compiled functions that
initialise, step and evaluate them.

A chunk (:mod:`cka_jax.train.population`) holds, on every device, ``models_per_call`` of its
models; one compiled function steps every chunk. Host values come back in model order, padding
dropped: ``(M, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cka_jax.data import datasets as data
from cka_jax.models import ResNetTrunk
from cka_jax.train import population as pop
from cka_jax.train import step as training
from cka_jax.train.device_batches import TrainInputs


class ChunkedStates:
    """The M models' :class:`~cka_jax.train.step.TrainState` on devices, split in chunks."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: ResNetTrunk,
        layout: pop.PopulationLayout,
        train_step: Callable,
        tx: optax.GradientTransformation,
    ):
        """``train_step``: one model's ``step(state, images, labels, mean, std) -> state``."""
        self.layout = layout
        self.step_fn = pop.map_models(train_step, layout, donate=True)
        self.eval_fn = pop.map_models(training.make_eval_step(model, config, False), layout)
        self.predict_fn = pop.map_models(training.make_eval_step(model, config, True), layout)
        sample = jnp.zeros((1,) + data.image_shape(config), jnp.float32)

        def init(keys):  # keys: (2, 2) raw keys: init key, data key
            return training.create_train_state(model, tx, keys[0], keys[1], sample)

        self.init_fn = pop.map_models(init, layout)
        keys = pop.model_keys(config.population.seed, layout.padded_size)
        init_keys = np.asarray(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys))
        data_keys = np.asarray(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
        if config.population.shared_data_order:
            data_keys = np.broadcast_to(data_keys[:1], data_keys.shape)
        self._keys = np.stack([init_keys, data_keys], axis=1)  # (M_pad, 2, 2)
        self.chunks: list[Any] = []

    def _chunk_keys(self, k: int) -> jax.Array:
        return pop.host_to_sharded(self._keys[self.layout.chunk_models(k)], self.layout.sharded)

    def initialize(self) -> None:
        self.chunks = [self.init_fn(self._chunk_keys(k)) for k in range(self.layout.num_chunks)]

    def fill_with_zeros(self) -> None:
        """Chunks of zeros shaped and sharded like initialised ones, for timing the step: nothing
        of the initialisation is compiled or run (compiling it costs more than compiling the step).
        A step takes as long on zeros as on initialised states, and the zeros stay finite through
        the steps."""
        chunk = jax.eval_shape(self.init_fn, self._chunk_keys(0))
        self.chunks = [
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=self.layout.sharded), chunk)
            for _ in range(self.layout.num_chunks)
        ]

    def abstract_state(self, padded_size: int | None = None) -> Any:
        """ShapeDtypeStructs of the stacked population (sharded, or replicated if uneven)."""
        padded_size = padded_size or self.layout.padded_size
        sharding = self.layout.sharded if padded_size % self.layout.num_devices == 0 else self.layout.replicated
        chunk = jax.eval_shape(self.init_fn, self._chunk_keys(0))
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((padded_size,) + a.shape[1:], a.dtype, sharding=sharding), chunk
        )

    def stacked(self) -> Any:
        return pop.merge_chunks(self.chunks, self.layout)

    def load(self, stacked: Any) -> None:
        """Take a restored stacked state; re-pad it if it was saved with another padding."""
        saved = jax.tree.leaves(stacked)[0].shape[0]
        if saved != self.layout.padded_size:
            self.initialize()
            fresh = pop.to_host(self.stacked())
            real = pop.to_host(stacked)
            m = self.layout.size
            stacked = jax.tree.map(
                lambda r, f: pop.host_to_sharded(np.concatenate([r[:m], f[m:]]), self.layout.sharded), real, fresh
            )
        self.chunks = pop.split_chunks(stacked, self.layout)

    def train_step(self, *shared) -> None:
        """One step of every model; ``shared``: ``images, labels, mean, std`` on every device."""
        self.chunks = [self.step_fn(chunk, *shared) for chunk in self.chunks]

    def per_model(self, compiled: Callable) -> np.ndarray:
        """(M, ...) host values of ``compiled`` (a :func:`~cka_jax.train.population.map_models`
        function of one chunk) over every chunk: one transfer per chunk."""
        return self._gather([pop.to_host(compiled(chunk)) for chunk in self.chunks])

    def _gather(self, per_chunk: list[np.ndarray]) -> np.ndarray:
        """Per-chunk host arrays (D*c, ...) → (M, ...) in model order."""
        out = np.empty((self.layout.padded_size,) + per_chunk[0].shape[1:], per_chunk[0].dtype)
        for k, values in enumerate(per_chunk):
            out[self.layout.chunk_models(k)] = values
        return out[: self.layout.size]

    def test_accuracy(self, inputs: TrainInputs) -> np.ndarray:
        """(M,) accuracy on the test set (one pass over it, every chunk per batch)."""
        mean, std = inputs.mean, inputs.std
        totals = [0.0] * len(self.chunks)
        for batch, _ in inputs.eval_set.batches():
            for k, chunk in enumerate(self.chunks):
                totals[k] = totals[k] + self.eval_fn(chunk, *batch, mean, std)["correct"]
        return self._gather([pop.to_host(t) for t in totals]) / inputs.eval_set.num_examples

    def test_logits(self, inputs: TrainInputs, dtype) -> tuple[np.ndarray, np.ndarray]:
        """(M, N, C) logits in ``dtype`` and (N,) labels of the test set."""
        mean, std = inputs.mean, inputs.std
        parts: list[list[np.ndarray]] = [[] for _ in self.chunks]
        labels = []
        for batch, batch_labels in inputs.eval_set.batches():
            valid = len(batch_labels)
            labels.append(batch_labels)
            for k, chunk in enumerate(self.chunks):
                logits = pop.to_host(self.predict_fn(chunk, *batch, mean, std)["logits"])
                parts[k].append(logits[:, :valid].astype(dtype))
        per_chunk = [np.concatenate(p, axis=1) for p in parts]
        return self._gather(per_chunk), np.concatenate(labels).astype(np.int32)
