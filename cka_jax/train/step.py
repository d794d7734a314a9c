"""One model's training math: state, optimizer, train step, evaluation (pure functions).

Everything here is written for a single model; :mod:`cka_jax.train.population` maps it over the
population (vmap or loop) and shards it over devices. A step depends only on the state it is
given (its data order and augmentation come from the state's own key and step), so a model
computes the same numbers however the population is laid out, interrupted or resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from cka_jax.data import datasets as data_lib

PyTree = Any
EPOCH_SUMS = ("loss", "correct", "count")  # TrainState.epoch_sums columns


class TrainState(struct.PyTreeNode):
    """One model's training state; stacked on axis 0 for a population.

    Attributes:
      step: () int32, optimizer steps taken.
      params, batch_stats: the model's variables (each model keeps its own BatchNorm stats).
      opt_state: optax state.
      data_key: (2,) uint32 raw key for this model's data order and augmentation.
      epoch_sums: (3,) float32, this epoch's summed train loss, correct count, example count.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    data_key: jax.Array
    epoch_sums: jax.Array

    def variables(self) -> dict[str, PyTree]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup over ``train.warmup_epochs`` then cosine decay to 0 at the last step."""
    total = config.train.epochs * steps_per_epoch
    warmup = int(round(config.train.warmup_epochs * steps_per_epoch))
    peak = config.train.learning_rate
    if warmup == 0:
        return optax.cosine_decay_schedule(peak, total)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1))


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum on the schedule above (weight decay is an L2 term in the loss)."""
    return optax.sgd(
        learning_rate_schedule(config, steps_per_epoch),
        momentum=config.train.momentum or None,
        nesterov=config.train.nesterov,
    )


def l2_of_kernels(params: PyTree) -> jax.Array:
    """Sum of squares of every ``kernel`` leaf (convolutions and dense layers; not BN, biases)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    squares = [
        jnp.sum(jnp.square(x.astype(jnp.float32))) for path, x in leaves if getattr(path[-1], "key", None) == "kernel"
    ]
    return sum(squares, jnp.zeros((), jnp.float32))


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    init_key: jax.Array,
    data_key: jax.Array,
    sample_images: jax.Array,
) -> TrainState:
    """Initialise one model. ``sample_images``: (B, H, W, C) float, shape only matters."""
    variables = model.init(init_key, sample_images)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        data_key=data_key,
        epoch_sums=jnp.zeros((len(EPOCH_SUMS),), jnp.float32),
    )


def state_is_finite(state: TrainState) -> jax.Array:
    """() bool: every float in one model's state is finite (params, BatchNorm statistics,
    optimizer state, epoch sums). One pass over the state, reduced on device."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _loss_and_update(
    model, tx, config, state: TrainState, images: jax.Array, labels: jax.Array, num_classes: int, new_epoch: jax.Array
) -> TrainState:
    """SGD step on a normalised (B, H, W, C) batch; accumulates the epoch's train metrics."""
    smoothing, weight_decay = config.train.label_smoothing, config.train.weight_decay
    targets = (
        optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
        if smoothing
        else jax.nn.one_hot(labels, num_classes)
    )

    def loss_fn(params):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        logits = logits.astype(jnp.float32)
        cross_entropy = optax.softmax_cross_entropy(logits, targets).mean()
        loss = cross_entropy + 0.5 * weight_decay * l2_of_kernels(params)
        return loss, (cross_entropy, logits, new_vars["batch_stats"])

    grads, (cross_entropy, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    batch = jnp.float32(labels.shape[0])
    sums = jnp.where(new_epoch, 0.0, state.epoch_sums) + jnp.stack([cross_entropy * batch, correct, batch])
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
        epoch_sums=sums,
    )


def make_in_memory_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    num_classes: int,
    num_train: int,
    batch_size: int,
) -> Callable:
    """``step(state, images, labels, mean, std) -> state`` for a data set held on device.

    ``images`` (N, H, W, C) uint8 and ``labels`` (N,) are the whole training set; the step
    takes batch ``state.step % steps_per_epoch`` of this epoch's permutation (drawn from the
    model's data key and the epoch), augments it (reflect-pad crop, flip) and updates.
    """
    steps_per_epoch = num_train // batch_size
    dtype = jnp.dtype(config.model.dtype)

    def step(state: TrainState, images, labels, mean, std) -> TrainState:
        epoch, position = jnp.divmod(state.step, steps_per_epoch)
        perm_key, augment_key = jax.random.split(jax.random.fold_in(state.data_key, epoch))
        order = jax.random.permutation(perm_key, num_train)
        index = jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))
        batch = data_lib.augment_images(
            jax.random.fold_in(augment_key, position), images[index], config.data.crop_padding, config.data.flip
        )
        return _loss_and_update(
            model,
            tx,
            config,
            state,
            data_lib.normalize(batch, mean, std, dtype),
            labels[index],
            num_classes,
            position == 0,
        )

    return step


def make_streamed_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    num_classes: int,
    steps_per_epoch: int,
) -> Callable:
    """``step(state, images, labels, mean, std) -> state`` on a host-augmented (B, H, W, C)
    uint8 batch shared by the population (streamed data sets)."""
    dtype = jnp.dtype(config.model.dtype)

    def step(state: TrainState, images, labels, mean, std) -> TrainState:
        return _loss_and_update(
            model,
            tx,
            config,
            state,
            data_lib.normalize(images, mean, std, dtype),
            labels,
            num_classes,
            state.step % steps_per_epoch == 0,
        )

    return step


def make_eval_step(model: nn.Module, config: ml_collections.ConfigDict, with_logits: bool) -> Callable:
    """``eval(state, images, labels, valid, mean, std) -> {'correct': (), ['logits': (E, C)]}``.

    ``images`` (E, H, W, C) uint8 is one padded eval batch; ``valid`` (E,) bool marks real rows.
    """
    dtype = jnp.dtype(config.model.dtype)

    def evaluate(state: TrainState, images, labels, valid, mean, std) -> dict[str, jax.Array]:
        logits = jnp.asarray(model.apply(state.variables(), data_lib.normalize(images, mean, std, dtype)))
        logits = logits.astype(jnp.float32)
        out = {"correct": jnp.sum((jnp.argmax(logits, -1) == labels) & valid).astype(jnp.float32)}
        if with_logits:
            out["logits"] = logits
        return out

    return evaluate
