"""Orbax checkpoints of a population, corruption fallback, and stop-on-signal.

The checkpointed pytree is the padded, stacked population :class:`~cka_jax.training.TrainState`
(params, batch stats, optimizer state, step, data keys, epoch metric sums), sharded over the
population axis. The latest ``max_to_keep`` checkpoints are kept, and milestone steps (e.g.
0, 35, 75, 100% of training) forever, for learning-dynamics analyses.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterable
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

PyTree = Any
logger = logging.getLogger(__name__)


class PopulationCheckpoints:
    """Save and restore a population state under ``directory`` (one subdirectory per step)."""

    def __init__(self, directory: str, max_to_keep: int = 2,
                 milestone_steps: Iterable[int] = ()):
        self.directory = os.path.abspath(directory)
        self.milestone_steps = sorted(set(int(s) for s in milestone_steps))
        policy = preservation.AnyPreservationPolicy([
            preservation.LatestN(max_to_keep),
            preservation.CustomSteps(self.milestone_steps)])
        self._options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options,
                                     item_handlers=ocp.StandardCheckpointHandler())

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def saved_population_size(self, step: int) -> int | None:
        """Leading (padded population) size of the checkpoint at ``step``; None if unreadable."""
        try:
            return int(self._manager.item_metadata(step).tree["step"].shape[0])
        except Exception:  # a damaged checkpoint; restore_latest reports it
            return None

    def save(self, step: int, state: PyTree) -> None:
        """Save asynchronously (no-op if ``step`` is already saved)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore_step(self, step: int, abstract_state: PyTree) -> PyTree:
        """The checkpoint at ``step`` restored onto ``abstract_state`` (ShapeDtypeStructs)."""
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree] | None:
        """Newest restorable checkpoint as ``(step, state)``, or None if there is none.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` with shardings. A checkpoint
        that fails to restore is reported, moved to ``<directory>.corrupt/<step>`` and the
        previous one tried.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return step, self.restore_step(step, abstract_state)
            except Exception as error:  # orbax raises assorted errors on damaged files
                logger.error("checkpoint at step %d in %s cannot be restored (%s: %s); "
                             "falling back to the previous one", step, self.directory,
                             type(error).__name__, error)
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            target = os.path.join(self.directory + ".corrupt", str(step))
            if os.path.exists(target):
                shutil.rmtree(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        self._manager.close()
        self._manager = self._open()

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: whether the coordination service reports a preemption (all hosts agree)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def milestone_steps(fractions: Iterable[float], total_steps: int) -> list[int]:
    """Training steps at the given fractions of ``total_steps`` (rounded)."""
    return sorted({int(round(f * total_steps)) for f in fractions})


class StopOnSignal:
    """Context manager: SIGTERM/SIGINT set a flag instead of killing the process.

    The training loop polls :meth:`is_set`, checkpoints and returns. A second SIGINT raises
    ``KeyboardInterrupt`` as usual. Handlers are restored on exit; works in the main thread.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._signals = signals
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.received: int | None = None

    def _handle(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
