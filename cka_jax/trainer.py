"""train_and_evaluate: a population of M seeds of one network, trained and evaluated together.

Workdir layout::

    config.json            the run's config (a rerun with a different one is refused)
    checkpoints/<step>/    orbax checkpoints of the whole population (resumed automatically)
    metrics.jsonl          one line per (epoch, model): train loss/accuracy, test accuracy
    predictions/test.npz   logits (M, N, C) and labels (N,) of every model on the test set
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cka_jax import checkpoints as ckpt_lib
from cka_jax import data as data_lib
from cka_jax import population as pop
from cka_jax import run_config
from cka_jax import training
from cka_jax.models import create_model

logger = logging.getLogger(__name__)

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
STREAMED_DATASETS = ("imagenet2012",)


class Progress(Protocol):
    """What the loop reports to (a ``tqdm`` bar over epochs fits)."""
    def update(self, n: int = 1) -> Any: ...
    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...


@dataclasses.dataclass(frozen=True)
class RunResult:
    step: int                      # optimizer steps done
    total_steps: int
    interrupted: bool              # stopped by should_stop before the end
    test_accuracy: np.ndarray | None  # (M,) at the end, None if interrupted


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    if config.data.name == "digits":
        return (8, 8, 1)
    if config.data.name in ("cifar10", "cifar100"):
        return (32, 32, 3)
    return (config.data.image_size, config.data.image_size, 3)


def build_model(config: ml_collections.ConfigDict):
    """The configured flax model; ``ValueError`` for an invalid architecture."""
    m = config.model
    kwargs = dict(residual=m.residual, zero_init_last_bn=m.zero_init_last_bn,
                  dtype=jnp.dtype(m.dtype))
    if m.name == "cifar_resnet":
        kwargs.update(depth=m.depth, width=m.width)
    else:
        kwargs.update(stage_sizes=tuple(m.stage_sizes), stage_widths=tuple(m.stage_widths))
    return create_model(m.name, num_classes=NUM_CLASSES[config.data.name], **kwargs)


class RunConfigError(ValueError):
    """The run cannot start: bad config, architecture, layout or workdir (nothing was done)."""


def check_run(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None):
    """Every check that needs no data: config, architecture, layout. Returns (model, layout).

    Raises :class:`RunConfigError` with the reason.
    """
    try:
        run_config.validate_config(config)
        if config.data.name in STREAMED_DATASETS and not config.population.shared_data_order:
            raise ValueError(f"{config.data.name} is streamed from host, so the population "
                             "shares its batches: set population.shared_data_order=True")
        model = build_model(config)
        jax.eval_shape(model.init, jax.random.PRNGKey(0),
                       jnp.zeros((1,) + image_shape(config), jnp.float32))
        layout = pop.make_layout(config.population.size, config.population.strategy, devices)
    except RunConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise RunConfigError(str(error)) from error
    return model, layout


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuse a workdir whose config.json holds a different run; write config.json if new."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diffs = run_config.config_differences(saved, config)
        if diffs:
            raise RunConfigError(f"workdir {workdir} holds a run with a different config; use another "
                             "--workdir or the same config. Differences: " + "; ".join(diffs))
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        _write_atomic(path, json.dumps(run_config.flat_config(config), indent=2, sort_keys=True))


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _truncate_metrics(path: str, max_step: int) -> None:
    """Drop metric lines past ``max_step`` (written after the checkpoint a run resumes from)."""
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= max_step]
    _write_atomic(path, "".join(lines))


class _EvalSet:
    """The test set as fixed-shape padded batches: held on device, or streamed from host."""

    def __init__(self, host_batches: Callable[[], Iterator], num_examples: int, sharding,
                 keep_on_device: bool):
        self.num_examples, self._sharding = num_examples, sharding
        self._host_batches = host_batches
        self._cached = list(self._transfer(host_batches())) if keep_on_device else None

    def _transfer(self, batches):
        for images, labels, valid in batches:
            yield (tuple(pop.host_to_sharded(a, self._sharding) for a in (images, labels, valid)),
                   labels[valid])

    def batches(self) -> Iterator[tuple[tuple[jax.Array, jax.Array, jax.Array], np.ndarray]]:
        """((images, labels, valid) on device, the batch's real labels on host) per batch."""
        return iter(self._cached) if self._cached is not None else self._transfer(self._host_batches())

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, batch_size: int,
                    sharding) -> "_EvalSet":
        n = len(labels)
        batch_size = min(batch_size, n)
        padded = -(-n // batch_size) * batch_size
        pad = padded - n
        images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        all_labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
        valid = np.arange(padded) < n

        def host_batches():
            for i in range(0, padded, batch_size):
                yield images[i:i + batch_size], all_labels[i:i + batch_size], valid[i:i + batch_size]
        return cls(host_batches, n, sharding, keep_on_device=True)


class _Population:
    """The population's compiled functions and state chunks for one run."""

    def __init__(self, config, model, layout: pop.PopulationLayout, train_step: Callable,
                 tx, sample_shape: tuple[int, ...]):
        self.layout = layout
        self.step_fn = pop.map_models(train_step, layout, donate=True)
        self.eval_fn = pop.map_models(training.make_eval_step(model, config, False), layout)
        self.predict_fn = pop.map_models(training.make_eval_step(model, config, True), layout)
        sample = jnp.zeros((1,) + tuple(sample_shape), jnp.float32)

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

    def abstract_state(self, padded_size: int | None = None) -> Any:
        """ShapeDtypeStructs of the stacked population (sharded, or replicated if uneven)."""
        padded_size = padded_size or self.layout.padded_size
        sharding = (self.layout.sharded if padded_size % self.layout.num_devices == 0
                    else self.layout.replicated)
        chunk = jax.eval_shape(self.init_fn, self._chunk_keys(0))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            (padded_size,) + a.shape[1:], a.dtype, sharding=sharding), chunk)

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
                lambda r, f: pop.host_to_sharded(np.concatenate([r[:m], f[m:]]), self.layout.sharded),
                real, fresh)
        self.chunks = pop.split_chunks(stacked, self.layout)

    def train_step(self, *shared) -> None:
        self.chunks = [self.step_fn(chunk, *shared) for chunk in self.chunks]

    def _gather(self, per_chunk: list[np.ndarray]) -> np.ndarray:
        """Per-chunk host arrays (D*c, ...) → (M, ...) in model order."""
        out = np.empty((self.layout.padded_size,) + per_chunk[0].shape[1:], per_chunk[0].dtype)
        for k, values in enumerate(per_chunk):
            out[self.layout.chunk_models(k)] = values
        return out[:self.layout.size]

    def epoch_sums(self) -> np.ndarray:
        """(M, 3) summed train loss, correct, count of the current epoch."""
        return self._gather([pop.to_host(c.epoch_sums) for c in self.chunks])

    def test_accuracy(self, eval_set: _EvalSet, mean, std) -> np.ndarray:
        """(M,) accuracy on the test set (one pass over it, every chunk per batch)."""
        totals = [0.0] * len(self.chunks)
        for batch, _ in eval_set.batches():
            for k, chunk in enumerate(self.chunks):
                totals[k] = totals[k] + self.eval_fn(chunk, *batch, mean, std)["correct"]
        return self._gather([pop.to_host(t) for t in totals]) / eval_set.num_examples

    def test_logits(self, eval_set: _EvalSet, mean, std, dtype) -> tuple[np.ndarray, np.ndarray]:
        """(M, N, C) logits in ``dtype`` and (N,) labels of the test set."""
        parts, labels = [[] for _ in self.chunks], []
        for batch, batch_labels in eval_set.batches():
            valid = len(batch_labels)
            labels.append(batch_labels)
            for k, chunk in enumerate(self.chunks):
                logits = pop.to_host(self.predict_fn(chunk, *batch, mean, std)["logits"])
                parts[k].append(logits[:, :valid].astype(dtype))
        per_chunk = [np.concatenate(p, axis=1) for p in parts]
        return self._gather(per_chunk), np.concatenate(labels).astype(np.int32)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       progress: Progress | None = None,
                       should_stop: Callable[[], bool] | None = None,
                       devices: Sequence[jax.Device] | None = None) -> RunResult:
    """Train ``config.population.size`` models, resuming from ``workdir`` if it holds a run.

    Args:
      config: a validated-on-entry run config (see :mod:`cka_jax.run_config`).
      workdir: output directory (layout in the module docstring).
      progress: receives one ``update`` per epoch and a postfix with images/s and test accuracy.
      should_stop: polled after every step; when true the population is checkpointed and the
        function returns with ``interrupted=True`` (re-running resumes). On several hosts the
        JAX coordination service's preemption notice is used instead, so all hosts agree.
      devices: devices to shard the population over (default: all).
    """
    model, layout = check_run(config, devices)
    check_workdir(workdir, config)
    logger.info("population of %d (padded to %d) on %d devices, %d per device, strategy %s",
                layout.size, layout.padded_size, layout.num_devices, layout.per_device,
                layout.strategy)

    streamed = config.data.name in STREAMED_DATASETS
    if streamed:
        from cka_jax import imagenet_stream
        source = imagenet_stream.ImageNetStream(config)
        num_train, mean, std = source.num_train, imagenet_stream.MEAN, imagenet_stream.STD
    else:
        data = data_lib.load_in_memory(
            config.data.name, config.data.fraction, config.data.seed, config.data.random_labels,
            config.data.data_dir or None)
        num_train, mean, std = len(data.train_labels), data.mean, data.std
    batch_size = min(config.train.batch_size, num_train)
    if batch_size < config.train.batch_size:
        logger.warning("training set of %d examples is smaller than train.batch_size=%d; using "
                       "batches of %d", num_train, config.train.batch_size, batch_size)
    steps_per_epoch = num_train // batch_size
    tx = training.make_optimizer(config, steps_per_epoch)
    num_classes = NUM_CLASSES[config.data.name]
    replicated = layout.replicated
    if streamed:
        step_fn = training.make_streamed_train_step(model, tx, config, num_classes, steps_per_epoch)

        def train_inputs(start_step: int) -> Iterator[tuple[jax.Array, jax.Array]]:
            for batch in source.train_batches(start_step, batch_size):
                yield tuple(pop.host_to_sharded(a, replicated) for a in batch)

        eval_set = _EvalSet(lambda: source.test_batches(config.train.eval_batch_size),
                            source.num_test, replicated, keep_on_device=False)
    else:
        step_fn = training.make_in_memory_train_step(model, tx, config, num_classes, num_train,
                                                     batch_size)
        on_device = (pop.host_to_sharded(data.train_images, replicated),
                     pop.host_to_sharded(data.train_labels, replicated))

        def train_inputs(start_step: int) -> Iterator[tuple[jax.Array, jax.Array]]:
            while True:  # the step picks its own batch from the whole training set
                yield on_device

        eval_set = _EvalSet.from_arrays(data.test_images, data.test_labels,
                                        config.train.eval_batch_size, replicated)
    total_steps = config.train.epochs * steps_per_epoch
    run = _Run(config=config, workdir=workdir,
               population=_Population(config, model, layout, step_fn, tx, image_shape(config)),
               checkpoints=ckpt_lib.PopulationCheckpoints(
                   os.path.join(workdir, "checkpoints"), config.checkpoint.max_to_keep,
                   ckpt_lib.milestone_steps(config.checkpoint.keep_at_fractions, total_steps)),
               train_inputs=train_inputs, eval_set=eval_set,
               normalization=tuple(pop.host_to_sharded(np.asarray(a, np.float32), replicated)
                                   for a in (mean, std)),
               batch_size=batch_size, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    try:
        return _train(run, progress, should_stop)
    finally:
        run.checkpoints.close()


@dataclasses.dataclass
class _Run:
    """Everything one call of train_and_evaluate works with."""
    config: ml_collections.ConfigDict
    workdir: str
    population: _Population
    checkpoints: ckpt_lib.PopulationCheckpoints
    train_inputs: Callable[[int], Iterator[tuple[jax.Array, jax.Array]]]  # from a step on
    eval_set: _EvalSet
    normalization: tuple[jax.Array, jax.Array]   # mean, std (C,)
    batch_size: int
    steps_per_epoch: int
    total_steps: int


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its config.json)."""
    with open(os.path.join(workdir, "config.json")) as f:
        return run_config.config_from_flat(json.load(f))


def load_trained_population(workdir: str, step: int | None = None):
    """Restore a workdir's population for analysis, on the default device.

    Returns ``(config, model, variables, step)`` with ``variables = {'params', 'batch_stats'}``
    stacked on a leading model axis of size ``population.size`` (padding dropped); ``step``
    defaults to the latest checkpoint (see ``checkpoint.keep_at_fractions`` for others).
    """
    config = load_config(workdir)
    model = build_model(config)
    checkpoints = ckpt_lib.PopulationCheckpoints(os.path.join(workdir, "checkpoints"))
    try:
        step = checkpoints.all_steps()[-1] if step is None else step
        padded = checkpoints.saved_population_size(step)
        tx = training.make_optimizer(config, 1)
        sample = jnp.zeros((1,) + image_shape(config), jnp.float32)
        one = jax.eval_shape(lambda: training.create_train_state(
            model, tx, jax.random.PRNGKey(0), jax.random.PRNGKey(0), sample))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((padded,) + a.shape, a.dtype,
                                                               sharding=device), one)
        state = checkpoints.restore_step(step, abstract)
    finally:
        checkpoints.close()
    size = config.population.size
    variables = jax.tree.map(lambda x: x[:size], state.variables())
    return config, model, variables, step


def _restore_or_init(population: _Population, checkpoints: ckpt_lib.PopulationCheckpoints) -> int:
    steps = checkpoints.all_steps()
    if steps:
        saved_size = checkpoints.saved_population_size(steps[-1])
        restored = checkpoints.restore_latest(population.abstract_state(saved_size))
        if restored is not None:
            step, state = restored
            population.load(state)
            logger.info("resumed from the checkpoint at step %d", step)
            return step
    population.initialize()
    return 0


def _log_epoch(run: _Run, step: int, images_per_s: float, progress: Progress | None) -> None:
    """Train metrics (and test accuracy when due) of every model: metrics.jsonl, log, bar."""
    population, config = run.population, run.config
    epoch = step // run.steps_per_epoch
    sums = population.epoch_sums()
    evaluate = epoch % config.train.eval_every_epochs == 0 or step == run.total_steps
    test_acc = population.test_accuracy(run.eval_set, *run.normalization) if evaluate else None
    learning_rate = float(training.learning_rate_schedule(config, run.steps_per_epoch)(step - 1))
    if jax.process_index() == 0:
        with open(os.path.join(run.workdir, "metrics.jsonl"), "a") as f:
            for m in range(population.layout.size):
                row = {"epoch": epoch, "step": step, "model": m,
                       "train_loss": float(sums[m, 0] / sums[m, 2]),
                       "train_accuracy": float(sums[m, 1] / sums[m, 2]),
                       "learning_rate": learning_rate,
                       "images_per_second": images_per_s / population.layout.size}
                if test_acc is not None:
                    row["test_accuracy"] = float(test_acc[m])
                f.write(json.dumps(row) + "\n")
    summary = f"{images_per_s:.0f} img/s"
    if test_acc is not None:
        summary += f", test acc {test_acc.mean():.4f} ± {test_acc.std():.4f}"
    logger.debug("epoch %d/%d (step %d): train loss %.4f, %s", epoch, config.train.epochs, step,
                 float(np.mean(sums[:, 0] / sums[:, 2])), summary)
    if progress is not None:
        progress.set_postfix_str(summary, refresh=False)
        progress.update(1)


def _write_predictions(run: _Run) -> np.ndarray:
    """predictions/test.npz (logits (M, N, C), labels (N,)); returns (M,) test accuracy."""
    logits, labels = run.population.test_logits(run.eval_set, *run.normalization,
                                                run.config.train.prediction_dtype)
    if jax.process_index() == 0:
        os.makedirs(os.path.join(run.workdir, "predictions"), exist_ok=True)
        path = os.path.join(run.workdir, "predictions", "test.npz")
        with open(path + ".tmp", "wb") as f:
            np.savez(f, logits=logits, labels=labels)
        os.replace(path + ".tmp", path)
    return (logits.argmax(-1) == labels[None]).mean(-1)


def _train(run: _Run, progress: Progress | None,
           should_stop: Callable[[], bool] | None) -> RunResult:
    population, checkpoints = run.population, run.checkpoints
    step = _restore_or_init(population, checkpoints)
    _truncate_metrics(os.path.join(run.workdir, "metrics.jsonl"), step)
    every = run.config.checkpoint.every_steps or run.steps_per_epoch
    milestones = set(checkpoints.milestone_steps)
    if step in milestones or step == 0:
        checkpoints.save(step, population.stacked())
    if progress is not None:
        progress.update(step // run.steps_per_epoch)

    inputs = run.train_inputs(step)
    epoch_start, epoch_start_step = time.perf_counter(), step
    while step < run.total_steps:
        population.train_step(*next(inputs), *run.normalization)
        step += 1
        if step % run.steps_per_epoch == 0:
            jax.block_until_ready(population.chunks)
            seconds = max(time.perf_counter() - epoch_start, 1e-9)
            images = population.layout.size * run.batch_size * (step - epoch_start_step)
            _log_epoch(run, step, images / seconds, progress)
            epoch_start, epoch_start_step = time.perf_counter(), step
        if jax.process_count() > 1:  # every host must stop at the same step
            stop = checkpoints.reached_preemption(step)
        else:
            stop = should_stop is not None and should_stop()
        if step % every == 0 or step in milestones or step == run.total_steps or stop:
            checkpoints.save(step, population.stacked())
        if stop and step < run.total_steps:
            checkpoints.wait()
            logger.info("stopped at step %d; the checkpoint there resumes the run", step)
            return RunResult(step, run.total_steps, True, None)

    accuracy = _write_predictions(run)
    checkpoints.wait()
    logger.info("done: test accuracy %.4f ± %.4f over %d models", accuracy.mean(), accuracy.std(),
                len(accuracy))
    return RunResult(step, run.total_steps, False, accuracy)
