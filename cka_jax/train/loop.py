"""train_and_evaluate: a population of M seeds of one network, trained and evaluated together.

The run, in the order :func:`train_and_evaluate` does it:

1. check config, architecture, layout and memory (:mod:`~cka_jax.train.run_checks`);
2. lock the workdir, refuse one that holds another run, write the config copies
   (:mod:`~cka_jax.train.workdir_checks`; the files are those of :mod:`cka_jax.workdir`);
3. put the data set on the devices (:mod:`~cka_jax.train.device_batches`) and build the population's
   training states there (:mod:`~cka_jax.train.chunked_states`), stepping as many models per call as
   ``population.strategy`` says or, for ``auto``, as measured (:mod:`~cka_jax.train.strategy_tuning`);
4. resume from the newest checkpoint that verifies (:mod:`~cka_jax.train.checkpoints`), else
   initialise;
5. train, epoch by epoch: after every epoch and before every checkpoint a health check
   (:mod:`~cka_jax.train.health`), after every epoch metrics (:mod:`~cka_jax.train.epoch_log`);
6. write the test predictions (:mod:`~cka_jax.train.predictions`).

A run that diverges (a non-finite loss or parameter, or an exploded loss) stops with
:class:`~cka_jax.train.health.TrainingDiverged`; it saves no checkpoint of the diverged state and
no predictions.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from cka_jax.models import ResNetTrunk
from cka_jax.train import checkpoints as ckpt_lib
from cka_jax.train import population as pop
from cka_jax.train import step as training
from cka_jax.train.chunked_states import ChunkedStates
from cka_jax.train.device_batches import open_inputs
from cka_jax.train.epoch_log import EpochLog, EpochSpeed, ProgressBar
from cka_jax.train.health import Health, HealthCheck, divergence
from cka_jax.train.predictions import write_predictions
from cka_jax.train.run_checks import check_run, check_total_steps
from cka_jax.train.strategy_tuning import population_states
from cka_jax.train.workdir_checks import check_workdir, lock_workdir, truncate_metrics
from cka_jax.workdir import Workdir

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunResult:
    step: int  # optimizer steps done
    total_steps: int
    interrupted: bool  # stopped by should_stop before the end
    test_accuracy: np.ndarray | None  # (M,) at the end, None if interrupted


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Which steps end an epoch, are checkpointed, are evaluated."""

    steps_per_epoch: int
    total_steps: int
    checkpoint_every: int  # steps
    eval_every_epochs: int
    milestones: frozenset[int]  # steps checkpointed and kept for good

    @classmethod
    def of(cls, config: ml_collections.ConfigDict, steps_per_epoch: int) -> StepPlan:
        total = config.train.epochs * steps_per_epoch
        milestones = ckpt_lib.milestone_steps(config.checkpoint.keep_at_fractions, total)
        every = config.checkpoint.every_steps or steps_per_epoch
        return cls(steps_per_epoch, total, every, config.train.eval_every_epochs, frozenset(milestones))

    def epoch_of(self, step: int) -> int:
        """The epoch (1-based) that step ``step`` ends or lies in."""
        return -(-step // self.steps_per_epoch)

    def epoch_end_after(self, step: int) -> int:
        """The step that ends the epoch after ``step``."""
        return (step // self.steps_per_epoch + 1) * self.steps_per_epoch

    def ends_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def saves_at(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step in self.milestones or step == self.total_steps

    def evaluates_at(self, step: int) -> bool:
        """Whether the epoch that ``step`` ends is evaluated on the test set."""
        return (step // self.steps_per_epoch) % self.eval_every_epochs == 0 or step == self.total_steps


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    progress: ProgressBar | None = None,
    should_stop: Callable[[], bool] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> RunResult:
    """Train ``config.population.size`` models, resuming from ``workdir`` if it holds a run.

    Args:
      config: a validated-on-entry run config (see :mod:`cka_jax.workdir.config`).
      workdir: output directory (files: :mod:`cka_jax.workdir`), locked while the run writes.
      progress: receives one ``update`` per epoch and a postfix with images/s and test accuracy.
      should_stop: polled once setup is done (data, initialisation or restore) and after every
        step; when true the population is checkpointed (if it has changed) and the function
        returns with ``interrupted=True`` (re-running resumes). On several hosts the JAX
        coordination service's preemption notice is used instead, so all hosts agree.
      devices: devices to shard the population over (default: all).

    Raises:
      RunConfigError: before any work: a bad config, or a workdir that holds another run, is
        locked by another run, or cannot be written (:class:`~cka_jax.workdir.config.RunConfigError`).
      TrainingDiverged: a model's loss or state became non-finite, or its loss exploded
        (:class:`~cka_jax.train.health.TrainingDiverged`).
    """
    model, layout = check_run(config, devices)
    with lock_workdir(workdir):
        check_workdir(workdir, config)
        return train_checked(config, workdir, model, layout, progress, should_stop)


def train_checked(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: ResNetTrunk,
    layout: pop.PopulationLayout,
    progress: ProgressBar | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """:func:`train_and_evaluate` after its checks, for a caller that ran them itself:
    ``(model, layout)`` from :func:`~cka_jax.train.run_checks.check_run`,
    :func:`~cka_jax.train.workdir_checks.check_workdir` passed, and
    :func:`~cka_jax.train.workdir_checks.lock_workdir` held around this call."""
    logger.info(
        "population of %d (padded to %d) on %d devices, %d per device, strategy %s",
        layout.size,
        layout.padded_size,
        layout.num_devices,
        layout.per_device,
        config.population.strategy,
    )
    inputs = open_inputs(config, layout.replicated)
    plan = StepPlan.of(config, inputs.steps_per_epoch)
    check_total_steps(config, plan.total_steps)
    tx = training.make_optimizer(config, plan.steps_per_epoch)
    states = population_states(config, workdir, model, layout, inputs, tx, plan.total_steps)  # auto: measured
    check_health = HealthCheck(states, inputs.num_classes)
    log = EpochLog(config, workdir, layout.size, plan.steps_per_epoch, progress)
    checkpoints = ckpt_lib.PopulationCheckpoints(
        Workdir(workdir).checkpoints, config.checkpoint.max_to_keep, plan.milestones
    )
    abandon = False  # the checkpoint in flight can never finish
    try:
        step = _restore_or_initialize(states, checkpoints)
        truncate_metrics(workdir, step)
        if step == 0 or step in plan.milestones:
            _stop_if_diverged(check_health(), step, plan, config, checkpoints)
            checkpoints.save(step, states.stacked())
        log.resumed_at(step)
        if step < plan.total_steps and _stop_requested(checkpoints, step, should_stop):
            return _interrupted(checkpoints, step, plan)  # asked during setup (data, compilation, restore)

        speed = EpochSpeed(layout.size * inputs.batch_size, step)
        while step < plan.total_steps:
            for images, labels in inputs.batches(step, plan.epoch_end_after(step)):
                states.train_step(images, labels, inputs.mean, inputs.std)
                step += 1
                stop = _stop_requested(checkpoints, step, should_stop)
                save = stop or plan.saves_at(step)
                health = None  # checked every epoch and before every save: no checkpoint diverged
                if plan.ends_epoch(step):
                    jax.block_until_ready(states.chunks)
                    images_per_s = speed.images_per_second(step)
                    health = check_health()
                    evaluate = not health.diverged and plan.evaluates_at(step)
                    log.epoch_done(step, health, images_per_s, states.test_accuracy(inputs) if evaluate else None)
                    speed.restart(step)
                elif save:
                    health = check_health()
                    if health.diverged:  # found inside an epoch: the workdir records it too
                        log.diverged_inside_epoch(step, health)
                if health is not None:
                    _stop_if_diverged(health, step, plan, config, checkpoints)
                if save:
                    checkpoints.save(step, states.stacked())
                if stop and step < plan.total_steps:
                    return _interrupted(checkpoints, step, plan)

        accuracy = write_predictions(config, workdir, states, inputs, plan.total_steps)
        checkpoints.wait()
        logger.info("done: test accuracy %.4f ± %.4f over %d models", accuracy.mean(), accuracy.std(), len(accuracy))
        return RunResult(step, plan.total_steps, False, accuracy)
    except BaseException as error:
        # An exchange with another process failed (it died): a checkpoint in flight waits for it at
        # orbax's barriers, and closing would wait there until JAX aborts this process; the caller
        # ends the process instead, with one line (train.py: exit status 4).
        abandon = pop.failed_exchange(error) is not None
        raise
    finally:
        if not abandon:
            checkpoints.close()


def _restore_or_initialize(states: ChunkedStates, checkpoints: ckpt_lib.PopulationCheckpoints) -> int:
    """Resume from the newest checkpoint that verifies (damaged ones are set aside, see
    :meth:`~cka_jax.train.checkpoints.PopulationCheckpoints.restore_latest`), else initialise.
    Returns the step."""
    restored = checkpoints.restore_latest(states.abstract_state)
    if restored is not None:
        step, state = restored
        states.load(state)
        logger.info("resumed from the checkpoint at step %d", step)
        return step
    states.initialize()
    return 0


def _stop_if_diverged(
    health: Health,
    step: int,
    plan: StepPlan,
    config: ml_collections.ConfigDict,
    checkpoints: ckpt_lib.PopulationCheckpoints,
) -> None:
    """Raise :class:`~cka_jax.train.health.TrainingDiverged` if a model diverged (after the checkpoints in flight are
    written, so that the message names the last one kept)."""
    if health.diverged:
        checkpoints.wait()
        raise divergence(health, step, plan.epoch_of(step), config.train.epochs, checkpoints.all_steps())


def _stop_requested(
    checkpoints: ckpt_lib.PopulationCheckpoints, step: int, should_stop: Callable[[], bool] | None
) -> bool:
    if jax.process_count() > 1:  # every host must stop at the same step
        return checkpoints.reached_preemption(step)
    return should_stop is not None and should_stop()


def _interrupted(checkpoints: ckpt_lib.PopulationCheckpoints, step: int, plan: StepPlan) -> RunResult:
    checkpoints.wait()
    logger.info("stopped at step %d; the checkpoint there resumes the run", step)
    return RunResult(step, plan.total_steps, True, None)
