"""Orbax checkpoints of a training population: saving, resuming from the newest one that
verifies, setting damaged ones aside, and milestones kept forever.

The checkpointed pytree is the padded, stacked population :class:`~cka_jax.train.step.TrainState`
(params, batch stats, optimizer state, step, data keys, epoch metric sums), sharded over the
population axis. The latest ``max_to_keep`` checkpoints are kept, and milestone steps (e.g.
0, 35, 75, 100% of training) forever, for learning-dynamics analyses.

Verification and reading are :class:`cka_jax.workdir.checkpoints.VerifiedCheckpoints`' (its
module docstring says how a checkpoint is verified and read beside a running training), which
:class:`PopulationCheckpoints` extends with writing: each save writes the manifest
(:class:`~cka_jax.workdir.checkpoint_manifest.ChecksummedHandler`), and training resumes from
the newest checkpoint that verifies and restores, setting the others aside (one log line each).
A checkpoint orbax drops (``max_to_keep``) is renamed into :data:`DELETED` at once and deleted
at the next save, so a reader never sees one half deleted.

A save that fails (e.g. disk full) raises :class:`CheckpointWriteError` at the next save,
``wait`` or ``close``; what it wrote is removed and the earlier checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from cka_jax.workdir import checkpoint_manifest as manifest
from cka_jax.workdir import orbax_noise
from cka_jax.workdir.checkpoints import (
    READ_ATTEMPTS,
    CheckpointError,
    CheckpointGoneError,
    DamagedCheckpointError,
    VerifiedCheckpoints,
)

__all__ = [
    "READ_ATTEMPTS",
    "DELETED",
    "CheckpointError",
    "CheckpointGoneError",
    "CheckpointWriteError",
    "DamagedCheckpointError",
    "PopulationCheckpoints",
    "milestone_steps",
]

PyTree = Any
logger = logging.getLogger(__name__)

# orbax renames a checkpoint it drops (max_to_keep) into this subdirectory, which the next save
# empties: a reader beside a running training then never sees a half-deleted checkpoint (files
# missing, truncated streams), as it can when checkpoints are deleted in place.
DELETED = "deleted"


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (e.g. disk full); earlier checkpoints are intact."""


class PopulationCheckpoints(VerifiedCheckpoints):
    """Save and restore a population state under ``directory`` (one subdirectory per step).

    ``read_only=True`` opens the checkpoints of another (possibly running) training for
    reading the whole state: nothing is created, cleaned up or moved.
    """

    def __init__(
        self, directory: str, max_to_keep: int = 2, milestone_steps: Iterable[int] = (), read_only: bool = False
    ):
        self.milestone_steps = sorted(set(int(s) for s in milestone_steps))
        self.read_only = read_only
        orbax_noise.silence()  # before orbax's first log line (the options log some)
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True)
        else:
            policy = preservation.AnyPreservationPolicy(
                [preservation.LatestN(max_to_keep), preservation.CustomSteps(self.milestone_steps)]
            )
            # cleanup: a save cut short (killed, disk full) leaves a temporary directory
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policy, create=True, cleanup_tmp_directories=True, todelete_subdir=DELETED
            )
        self._pending: int | None = None  # step of the save in flight
        self._failed = False  # a save failed (reported once, as CheckpointWriteError)
        self._open_manager(directory, options, manifest.ChecksummedHandler())

    def _restore_args(self, abstract: PyTree) -> ocp.args.CheckpointArgs:
        """The whole state, onto ``abstract`` (e.g. a :class:`~cka_jax.train.step.TrainState`)."""
        return manifest.ChecksummedRestore(abstract)

    # --------------------------------------------------------------------------- writing

    def save(self, step: int, state: PyTree) -> None:
        """Save asynchronously (no-op if ``step`` is already saved).

        Raises :class:`CheckpointWriteError` if this or the previous save failed.
        """
        if step in self._manager.all_steps():
            return
        self.wait()
        self._purge_deleted()
        self._pending = step
        with self._write_errors():
            self._manager.save(step, args=manifest.ChecksummedSave(state), force=True)

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        """orbax's errors of the save in flight → :class:`CheckpointWriteError` (one line)."""
        try:
            yield
        except Exception as error:
            if self._pending is None:
                raise
            raise self._write_error(error) from error

    def _write_error(self, error: Exception) -> CheckpointWriteError:
        step, self._pending, self._failed = self._pending, None, True
        assert step is not None  # called while a write is pending
        orbax_noise.collect_leftovers()
        self._remove_partial(step)
        kept = [s for s in self.all_steps() if s != step]
        earlier = f"earlier checkpoints are kept (latest: step {kept[-1]})" if kept else "no earlier checkpoint exists"
        full = orbax_noise.is_disk_full(error)
        what = "disk full" if full else f"failed ({orbax_noise.one_line(error)})"
        return CheckpointWriteError(
            f"{what} writing the checkpoint at step {step} in {self.directory}; {earlier}; "
            f"{'free space' if full else 'fix this'} and rerun the same command to resume",
            step,
            self.directory,
        )

    def _purge_deleted(self) -> None:
        """Delete the checkpoints orbax dropped (renamed into :data:`DELETED`) so far."""
        if jax.process_index() == 0:
            shutil.rmtree(os.path.join(self.directory, DELETED), ignore_errors=True)

    def _remove_partial(self, step: int) -> None:
        """Delete what a failed save of ``step`` left (frees the space it took)."""
        if jax.process_index() != 0:
            return
        for path in glob.glob(glob.escape(self.step_dir(step)) + ".orbax-checkpoint-tmp*"):
            shutil.rmtree(path, ignore_errors=True)

    def restore_latest(self, abstract_state: PyTree | Callable[[int | None], PyTree]) -> tuple[int, PyTree] | None:
        """Newest checkpoint that verifies and restores, as ``(step, state)``; None if none does.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` with shardings, or a function of
        a checkpoint's saved leading size (None if unreadable) that returns one. Every newer
        checkpoint is set aside (moved to ``<directory>.corrupt/``), one log line each: for the
        training that owns ``directory`` (readers use :meth:`~VerifiedCheckpoints.read`).
        """
        if self.read_only:
            raise ValueError(
                "restore_latest sets damaged checkpoints aside, which a read_only=True reader does not: use read()"
            )
        abstract_for = abstract_state if callable(abstract_state) else lambda size: abstract_state
        steps = sorted(self.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                return step, self._restore_sized(step, abstract_for)
            except CheckpointError as error:
                moved = self._quarantine(step)
                then = (
                    f"falling back to the checkpoint at step {steps[i + 1]}"
                    if i + 1 < len(steps)
                    else "no earlier checkpoint is left: training restarts from scratch (step 0)"
                )
                logger.error("%s; %s; %s", error, f"moved it to {moved}" if moved else "it is gone", then)
        return None

    def _quarantine(self, step: int) -> str | None:
        """Move the checkpoint at ``step`` to ``<directory>.corrupt/<step>`` (``<step>-2``, ...
        if that is taken); returns where it went, None if it is gone already."""
        self.wait()
        present = os.path.isdir(self.step_dir(step))
        target = os.path.join(self.directory + ".corrupt", str(step))
        suffix = 1
        while os.path.exists(target):
            suffix += 1
            target = os.path.join(self.directory + ".corrupt", f"{step}-{suffix}")
        if jax.process_index() == 0 and present:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(self.step_dir(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_processes(f"quarantine {step}")  # type: ignore[attr-defined]
        self._manager.close()
        self._manager = self._open()
        return target if present else None

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: whether the coordination service reports a preemption (all hosts agree)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until the save in flight is written; :class:`CheckpointWriteError` if it failed."""
        with self._write_errors():
            self._manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Finish the save in flight and close. Raises :class:`CheckpointWriteError` if it
        failed, unless another exception is propagating (the write error is then logged)."""
        propagating = sys.exc_info()[1]  # close() is called from `finally` blocks
        try:
            if not self._failed:
                self.wait()
                if not self.read_only:
                    self._purge_deleted()
        except CheckpointWriteError as error:
            if propagating is None:
                raise
            logger.error("%s", error)
        finally:
            with contextlib.suppress(Exception):  # orbax re-raises a failed save's error
                self._manager.close()


def milestone_steps(fractions: Iterable[float], total_steps: int) -> list[int]:
    """Training steps at the given fractions of ``total_steps`` (rounded)."""
    return sorted({int(round(f * total_steps)) for f in fractions})
