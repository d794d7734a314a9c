"""train_and_evaluate: a population of M seeds of one network, trained and evaluated together.

Workdir layout::

    config.json            the run's config (a rerun with a different one is refused)
    checkpoints/config.json  a copy of it, so that deleting one copy never unlocks the run
    checkpoints/<step>/    orbax checkpoints of the whole population (resumed automatically)
    metrics.jsonl          one line per (epoch, model): train loss/accuracy, test accuracy
                           (strict JSON, see :mod:`cka_jax.workdir.metrics_log`)
    predictions/test.npz   logits (M, N, C) and labels (N,) of every model on the test set
    .lock                  held by the run writing here (see :mod:`cka_jax.workdir.lock`)

A run that diverges (a non-finite loss or parameter, or an exploded loss) stops with
:class:`TrainingDiverged`; it saves no checkpoint of the diverged state and no predictions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cka_jax.workdir import atomic as atomic_file
from cka_jax.train import checkpoints as ckpt_lib
from cka_jax.train import data as data_lib
from cka_jax.workdir import metrics_log
from cka_jax.train import population as pop
from cka_jax.train import config as run_config
from cka_jax.train import step as training
from cka_jax.workdir import lock as workdir_lock
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


class TrainingDiverged(RuntimeError):
    """Training stopped because models diverged; nothing of the diverged state was saved.

    Attributes: ``models`` (indices of the diverged models), ``step`` (the step it was found at).
    """

    def __init__(self, message: str, models: Sequence[int], step: int):
        super().__init__(message)
        self.models, self.step = list(models), step


# The run's config is kept twice, beside the outputs and with the checkpoints: deleting one copy
# never lets a run with another config resume (or set aside) these checkpoints.
CONFIG_COPIES = ("config.json", os.path.join("checkpoints", "config.json"))
# int32 step counters (TrainState.step, the schedules) must not wrap.
MAX_TOTAL_STEPS = 2**31 - 1


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
        side = image_shape(config)[0]
        if config.data.crop_padding > side:
            raise ValueError(f"data.crop_padding must be at most the image side ({side}), got "
                             f"{config.data.crop_padding}")
        model = build_model(config)
        state = model_state_shape(config, model)  # an invalid architecture fails here
        layout = pop.make_layout(config.population.size, config.population.strategy, devices)
        check_memory(config, model, state, layout)
    except RunConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise RunConfigError(str(error)) from error
    return model, layout


def _check_is_directory(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunConfigError(f"--workdir {workdir} is a file, not a directory; use another --workdir")


@contextlib.contextmanager
def lock_workdir(workdir: str) -> Iterator[None]:
    """Hold ``workdir``'s lock (:mod:`cka_jax.workdir.lock`; process 0 of a multi-process run
    only) while the body runs. Creates the workdir. :class:`RunConfigError` if another run holds
    it or it cannot be created or written."""
    if jax.process_index() != 0:
        yield
        return
    _check_is_directory(workdir)
    try:
        lock = workdir_lock.acquire(workdir)
    except workdir_lock.WorkdirBusyError as error:
        raise RunConfigError(str(error)) from error
    except OSError as error:
        raise RunConfigError(f"cannot create or write --workdir {workdir} ({error})") from error
    try:
        yield
    finally:
        lock.release()


def _holds_run(workdir: str) -> bool:
    """Whether ``workdir`` holds outputs of a run: checkpoints, metrics or predictions."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints)):
        return True
    return any(os.path.exists(os.path.join(workdir, name))
               for name in (metrics_log.FILE_NAME, "predictions"))


def _saved_configs(workdir: str) -> dict[str, dict[str, Any]]:
    """The copies of the run's config in ``workdir`` by name (:data:`CONFIG_COPIES`), missing ones
    left out; :class:`RunConfigError` for a damaged one."""
    copies, damaged = {}, {}
    for name in CONFIG_COPIES:
        path = os.path.join(workdir, name)
        if os.path.lexists(path):
            try:
                copies[name] = run_config.read_flat_config(path)
            except (OSError, ValueError) as error:
                damaged[name] = error
    if damaged:
        name, error = next(iter(damaged.items()))
        fix = (f"delete it to have it rewritten from {os.path.join(workdir, next(iter(copies)))}"
               if copies else "restore it")
        raise RunConfigError(f"{os.path.join(workdir, name)} is damaged ({error}); nothing was "
                             f"changed: {fix}, or use another --workdir")
    return copies


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuse a workdir holding another run, then write the config's copies (:data:`CONFIG_COPIES`).

    Refused (:class:`RunConfigError`, nothing written): a file; a damaged copy; a copy that differs
    from ``config`` outside :data:`~cka_jax.train.config.RESUMABLE_FIELDS`; a run (checkpoints,
    metrics, predictions) with neither copy. A missing copy is restored.
    """
    _check_is_directory(workdir)
    copies = _saved_configs(workdir)
    for name, saved in copies.items():
        diffs = run_config.config_differences(saved, config)
        if diffs:
            raise RunConfigError(f"workdir {workdir} holds a run with a different config (its {name}); "
                                 "use another --workdir or the same config. Differences: "
                                 + "; ".join(diffs))
    if not copies and _holds_run(workdir):
        raise RunConfigError(
            f"workdir {workdir} holds a run (checkpoints, metrics or predictions) but neither of its "
            f"config copies ({' and '.join(CONFIG_COPIES)}), so nothing tells whether it is this "
            "run: restore one of them, or use another --workdir")
    if jax.process_index() == 0:
        text = json.dumps(run_config.flat_config(config), indent=2, sort_keys=True, allow_nan=False)
        try:
            for name in CONFIG_COPIES:
                path = os.path.join(workdir, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_file.write(path, text)
        except OSError as error:
            raise RunConfigError(f"cannot write to --workdir {workdir} ({error})") from error


def _truncate_metrics(path: str, max_step: int) -> None:
    """Drop metric lines past ``max_step`` (written after the checkpoint a run resumes from) and a
    torn last line; called before the run appends anything."""
    if jax.process_index() == 0:
        try:
            metrics_log.truncate(path, max_step)
        except ValueError as error:  # damaged before its last line: not ours to repair
            raise RunConfigError(f"{error}; move it aside to resume (the run rewrites its rows "
                                 "from the checkpoint on), or use another --workdir") from error


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
      config: a validated-on-entry run config (see :mod:`cka_jax.train.config`).
      workdir: output directory (layout in the module docstring), locked while the run writes.
      progress: receives one ``update`` per epoch and a postfix with images/s and test accuracy.
      should_stop: polled once setup is done (data, initialisation or restore) and after every
        step; when true the population is checkpointed (if it has changed) and the function
        returns with ``interrupted=True`` (re-running resumes). On several hosts the JAX
        coordination service's preemption notice is used instead, so all hosts agree.
      devices: devices to shard the population over (default: all).

    Raises:
      RunConfigError: before any work: a bad config, or a workdir that holds another run, is
        locked by another run, or cannot be written.
      TrainingDiverged: a model's loss or state became non-finite, or its loss exploded.
    """
    model, layout = check_run(config, devices)
    with lock_workdir(workdir):
        check_workdir(workdir, config)
        return train_checked(config, workdir, model, layout, progress, should_stop)


def train_checked(config: ml_collections.ConfigDict, workdir: str, model,
                  layout: pop.PopulationLayout, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> RunResult:
    """:func:`train_and_evaluate` after its checks, for a caller that ran them itself:
    ``(model, layout)`` from :func:`check_run`, :func:`check_workdir` passed, and
    :func:`lock_workdir` held around this call. Loads the data, builds the population, trains."""
    logger.info("population of %d (padded to %d) on %d devices, %d per device, strategy %s",
                layout.size, layout.padded_size, layout.num_devices, layout.per_device,
                layout.strategy)

    streamed = config.data.name in STREAMED_DATASETS
    if streamed:
        from cka_jax.train import imagenet_stream
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
    """The config a workdir was trained with: its config.json, or the copy with its checkpoints.

    Raises ``FileNotFoundError`` if there is neither, :class:`RunConfigError` if one is damaged
    or the two differ.
    """
    copies = _saved_configs(workdir)
    if not copies:
        raise FileNotFoundError(f"workdir {workdir} has no {' or '.join(CONFIG_COPIES)}: it holds "
                                "no train.py run")
    first, *others = copies.values()
    if any(run_config.config_differences(first, run_config.config_from_flat(o)) for o in others):
        raise RunConfigError(f"{' and '.join(os.path.join(workdir, n) for n in CONFIG_COPIES)} "
                             "differ: restore the run's config into both")
    return run_config.config_from_flat(first)


def load_trained_population(workdir: str, step: int | None = None):
    """Restore a workdir's population for analysis, on the default device.

    Returns ``(config, model, variables, step)`` with ``variables = {'params', 'batch_stats'}``
    stacked on a leading model axis of size ``population.size`` (padding dropped); ``step``
    defaults to the latest checkpoint (see ``checkpoint.keep_at_fractions`` for others). The
    checkpoint is verified against its checksums; a training still running on ``workdir`` may
    write and delete checkpoints meanwhile. Raises
    :class:`~cka_jax.train.checkpoints.DamagedCheckpointError` or
    :class:`~cka_jax.train.checkpoints.CheckpointGoneError` (see :meth:`PopulationCheckpoints.read`).
    """
    config = load_config(workdir)
    model = build_model(config)
    one = model_state_shape(config, model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract_for(padded: int | None):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            (padded or config.population.size,) + a.shape, a.dtype, sharding=device), one)

    checkpoints = ckpt_lib.PopulationCheckpoints(os.path.join(workdir, "checkpoints"),
                                                 read_only=True)
    try:
        step, state = checkpoints.read(abstract_for, step)
    finally:
        checkpoints.close()
    size = config.population.size
    variables = jax.tree.map(lambda x: x[:size], state.variables())
    return config, model, variables, step


def model_state_shape(config: ml_collections.ConfigDict, model) -> training.TrainState:
    """ShapeDtypeStructs of one model's :class:`~cka_jax.train.step.TrainState` (nothing is run)."""
    tx = training.make_optimizer(config, 1)
    sample = jnp.zeros((1,) + image_shape(config), jnp.float32)
    return jax.eval_shape(lambda: training.create_train_state(
        model, tx, jax.random.PRNGKey(0), jax.random.PRNGKey(0), sample))


def check_memory(config: ml_collections.ConfigDict, model, state: training.TrainState,
                 layout: pop.PopulationLayout) -> None:
    """``ValueError`` (one line) when the population cannot fit in memory, estimated from one
    model's ``state`` (:func:`model_state_shape`) and one chunk's activations (shapes only,
    nothing is run or compiled)."""
    images = jax.ShapeDtypeStruct((config.train.batch_size,) + image_shape(config),
                                  jnp.dtype(config.model.dtype))
    _, captured = jax.eval_shape(lambda variables, x: model.apply(
        variables, x, train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=True), state.variables(), images)
    # The output of every module of a training step: about what its backward pass keeps (a
    # block's output is counted with its layers' outputs, which covers the activations between
    # them); 22 GB for ImageNet ResNet-50 at batch 128. Evaluation keeps less.
    activations = _nbytes(captured["intermediates"]) * layout.models_per_call
    pop.check_memory(layout, _nbytes(state), activations)


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _restore_or_init(population: _Population, checkpoints: ckpt_lib.PopulationCheckpoints) -> int:
    """Resume from the newest checkpoint that verifies (damaged ones are set aside, see
    :meth:`~cka_jax.train.checkpoints.PopulationCheckpoints.restore_latest`), else initialise."""
    restored = checkpoints.restore_latest(population.abstract_state)
    if restored is not None:
        step, state = restored
        population.load(state)
        logger.info("resumed from the checkpoint at step %d", step)
        return step
    population.initialize()
    return 0


# An epoch's mean train cross-entropy above EXPLODED_LOSS_FACTOR * ln(C) (C classes) counts as a
# divergence. Predicting uniformly scores ln(C), an initialised network about that; a mean of
# 100 ln(C) means the true class gets on average a probability below C^-100, which a run that is
# learning never passes through. Measured on digits (ResNet-8, 2 models, 4 epochs): learning rates
# 0.1 to 10 peak at 5.6 (2.4 ln 10); 30 peaks at 115 (50 ln 10) and learns nothing; 100 and above
# reach 1e5 to 1e15 (1e4: 1.7e15 in epoch 1).
EXPLODED_LOSS_FACTOR = 100.0


@dataclasses.dataclass(frozen=True)
class _Health:
    """The population's divergence check at one step."""
    sums: np.ndarray        # (M, 3) this epoch's summed train loss, correct, count
    non_finite: list[int]   # models with a non-finite value anywhere in their state
    exploded: list[int]     # finite models whose mean train loss is above max_loss
    max_loss: float

    @property
    def diverged(self) -> list[int]:
        return sorted(self.non_finite + self.exploded)


def _health_values(state: training.TrainState) -> jax.Array:
    """(4,): one model's epoch sums (train loss, correct, count), then 1 if every float in its
    state is finite, else 0."""
    return jnp.append(state.epoch_sums, training.state_is_finite(state).astype(jnp.float32))


def _check_health(run: _Run, health_fn: Callable) -> _Health:
    """Which models diverged: per chunk, one reduction of its state on device (``health_fn``:
    :func:`_health_values` over the chunk) and one transfer of its values to host."""
    population = run.population
    values = population._gather([pop.to_host(health_fn(chunk)) for chunk in population.chunks])
    sums, finite = values[:, :3], values[:, 3] == 1
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_loss = sums[:, 0] / sums[:, 2]
    max_loss = EXPLODED_LOSS_FACTOR * math.log(NUM_CLASSES[run.config.data.name])
    exploded = finite & (sums[:, 2] > 0) & (mean_loss > max_loss)
    return _Health(sums, np.flatnonzero(~finite).tolist(), np.flatnonzero(exploded).tolist(),
                   max_loss)


def _model_list(indices: Sequence[int], shown: int = 20) -> str:
    more = f", ... ({len(indices)} in all)" if len(indices) > shown else ""
    return f"model{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices[:shown]))}{more}"


def _divergence(run: _Run, health: _Health, step: int) -> TrainingDiverged:
    """The error that stops a diverged run (after the checkpoints in flight are written)."""
    run.checkpoints.wait()
    kept = run.checkpoints.all_steps()
    parts = []
    if health.non_finite:
        parts.append(f"{_model_list(health.non_finite)} reached non-finite values (in the loss, "
                     "parameters, BatchNorm statistics or optimizer state)")
    if health.exploded:
        worst = max(health.sums[m, 0] / health.sums[m, 2] for m in health.exploded)
        parts.append(f"{_model_list(health.exploded)} reached a mean train loss of {worst:.3g} "
                     f"(above {health.max_loss:.0f} = {EXPLODED_LOSS_FACTOR:g} ln(classes): exploded)")
    last = (f"the last finite checkpoint (step {kept[-1]}) is kept" if kept
            else "no checkpoint is kept")
    epoch = -(-step // run.steps_per_epoch)
    return TrainingDiverged(
        f"training diverged at step {step} (epoch {epoch} of {run.config.train.epochs}): "
        + "; ".join(parts) + f". Nothing of it was saved: {last} and no predictions were written. "
        "Lower train.learning_rate (or add train.warmup_epochs) and train into a new --workdir.",
        health.diverged, step)


def _append_metrics(run: _Run, step: int, epoch: int, health: _Health, images_per_s: float,
                    test_acc: np.ndarray | None) -> None:
    """One metrics.jsonl row per model for ``epoch`` (its train sums so far), diverged models
    marked ``"diverged": true``."""
    if jax.process_index() != 0:
        return
    size, sums, diverged = run.population.layout.size, health.sums, set(health.diverged)
    learning_rate = float(training.learning_rate_schedule(run.config, run.steps_per_epoch)(step - 1))
    rows = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for m in range(size):
            row = {"epoch": epoch, "step": step, "model": m,
                   "train_loss": float(sums[m, 0] / sums[m, 2]),
                   # a non-finite loss comes from non-finite logits, whose argmax says nothing
                   "train_accuracy": (float(sums[m, 1] / sums[m, 2]) if np.isfinite(sums[m, 0])
                                      else None),
                   "learning_rate": learning_rate,
                   "images_per_second": images_per_s / size}
            if test_acc is not None:
                row["test_accuracy"] = float(test_acc[m])
            if m in diverged:
                row["diverged"] = True
            rows.append(row)
    metrics_log.append(metrics_log.path_in(run.workdir), rows)


def _log_epoch(run: _Run, step: int, images_per_s: float, progress: Progress | None,
               health: _Health) -> None:
    """Train metrics (and test accuracy when due and no model diverged) of every model:
    metrics.jsonl (diverged models marked ``"diverged": true``), log, bar."""
    population, config = run.population, run.config
    epoch = step // run.steps_per_epoch
    sums = health.sums
    evaluate = not health.diverged and (epoch % config.train.eval_every_epochs == 0
                                        or step == run.total_steps)
    test_acc = population.test_accuracy(run.eval_set, *run.normalization) if evaluate else None
    _append_metrics(run, step, epoch, health, images_per_s, test_acc)
    summary = f"{images_per_s:.0f} img/s"
    if test_acc is not None:
        summary += f", test acc {test_acc.mean():.4f} ± {test_acc.std():.4f}"
    logger.debug("epoch %d/%d (step %d): train loss %.4f, %s", epoch, config.train.epochs, step,
                 float(np.mean(sums[:, 0] / sums[:, 2])), summary)
    if progress is not None:
        progress.set_postfix_str(summary, refresh=False)
        progress.update(1)


def _write_predictions(run: _Run) -> np.ndarray:
    """predictions/test.npz (logits (M, N, C), labels (N,)); returns (M,) test accuracy.

    :class:`TrainingDiverged` (and nothing written) if any logit is not finite.
    """
    dtype = run.config.train.prediction_dtype
    logits, labels = run.population.test_logits(run.eval_set, *run.normalization, dtype)
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=(1, 2))).tolist()
    if bad:
        hint = "" if dtype == "float32" else f" (or exceed train.prediction_dtype={dtype}: use float32)"
        raise TrainingDiverged(f"the test logits of {_model_list(bad)} are not finite{hint}; no "
                               "predictions were written", bad, run.total_steps)
    if jax.process_index() == 0:
        os.makedirs(os.path.join(run.workdir, "predictions"), exist_ok=True)
        atomic_file.write(os.path.join(run.workdir, "predictions", "test.npz"),
                          lambda f: np.savez(f, logits=logits, labels=labels))
    return (logits.argmax(-1) == labels[None]).mean(-1)


def _stop_requested(checkpoints: ckpt_lib.PopulationCheckpoints, step: int,
                    should_stop: Callable[[], bool] | None) -> bool:
    if jax.process_count() > 1:  # every host must stop at the same step
        return checkpoints.reached_preemption(step)
    return should_stop is not None and should_stop()


def _interrupted(run: _Run, step: int) -> RunResult:
    run.checkpoints.wait()
    logger.info("stopped at step %d; the checkpoint there resumes the run", step)
    return RunResult(step, run.total_steps, True, None)


def _train(run: _Run, progress: Progress | None,
           should_stop: Callable[[], bool] | None) -> RunResult:
    population, checkpoints = run.population, run.checkpoints
    if run.total_steps > MAX_TOTAL_STEPS:
        raise RunConfigError(f"train.epochs={run.config.train.epochs} makes {run.total_steps} steps, "
                             f"more than a step counter holds ({MAX_TOTAL_STEPS})")
    health_fn = pop.map_models(_health_values, population.layout)
    step = _restore_or_init(population, checkpoints)
    _truncate_metrics(metrics_log.path_in(run.workdir), step)
    every = run.config.checkpoint.every_steps or run.steps_per_epoch
    milestones = set(checkpoints.milestone_steps)
    if step in milestones or step == 0:
        health = _check_health(run, health_fn)
        if health.diverged:
            raise _divergence(run, health, step)
        checkpoints.save(step, population.stacked())
    if progress is not None:
        progress.update(step // run.steps_per_epoch)
    if step < run.total_steps and _stop_requested(checkpoints, step, should_stop):
        return _interrupted(run, step)  # asked during setup (data, compilation, restore)

    inputs = run.train_inputs(step)
    epoch_start, epoch_start_step = time.perf_counter(), step
    while step < run.total_steps:
        population.train_step(*next(inputs), *run.normalization)
        step += 1
        stop = _stop_requested(checkpoints, step, should_stop)
        epoch_end = step % run.steps_per_epoch == 0
        save = step % every == 0 or step in milestones or step == run.total_steps or stop
        if epoch_end:
            jax.block_until_ready(population.chunks)
            seconds = max(time.perf_counter() - epoch_start, 1e-9)
            images = population.layout.size * run.batch_size * (step - epoch_start_step)
        # Every epoch and before every save, so that no checkpoint holds a diverged state.
        health = _check_health(run, health_fn) if epoch_end or save else None
        if epoch_end:
            _log_epoch(run, step, images / seconds, progress, health)
            epoch_start, epoch_start_step = time.perf_counter(), step
        if health is not None and health.diverged:
            if not epoch_end:  # found at a checkpoint inside an epoch: the workdir records it too
                _append_metrics(run, step, -(-step // run.steps_per_epoch), health, math.nan, None)
            raise _divergence(run, health, step)
        if save:
            checkpoints.save(step, population.stacked())
        if stop and step < run.total_steps:
            return _interrupted(run, step)

    accuracy = _write_predictions(run)
    checkpoints.wait()
    logger.info("done: test accuracy %.4f ± %.4f over %d models", accuracy.mean(), accuracy.std(),
                len(accuracy))
    return RunResult(step, run.total_steps, False, accuracy)
