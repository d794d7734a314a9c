"""Orbax checkpoints of a population, verified by checksums, with fallback from damaged ones.

The checkpointed pytree is the padded, stacked population :class:`~cka_jax.train.step.TrainState`
(params, batch stats, optimizer state, step, data keys, epoch metric sums), sharded over the
population axis. The latest ``max_to_keep`` checkpoints are kept, and milestone steps (e.g.
0, 35, 75, 100% of training) forever, for learning-dynamics analyses.

Integrity: each checkpoint carries a manifest of its files' sizes and SHA-256
(:mod:`cka_jax.train.checkpoint_manifest`), and every restore verifies the files first; a
restored state that records its step (a population's ``TrainState.step``) must be at the step
its directory names (a directory renamed or copied to another step is damaged). Training
resumes from the newest checkpoint that verifies and restores, setting the others aside (one log
line each); readers (analyses) get :class:`DamagedCheckpointError`. orbax's own reports of a
failure are dropped (:mod:`cka_jax.train.orbax_noise`): each failure is one exception here.

Reading beside a running training: orbax never rewrites a committed file; a checkpoint it
drops (``max_to_keep``) is renamed away at once (into :data:`DELETED`, emptied at the next
save). A read therefore either sees the verified bytes or fails because the checkpoint
vanished; :meth:`PopulationCheckpoints.read` then reads the newest one again
(:class:`CheckpointGoneError` when it keeps vanishing or a requested step is gone).

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
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from cka_jax.train import checkpoint_manifest as manifest
from cka_jax.train import orbax_noise

PyTree = Any
logger = logging.getLogger(__name__)

# How often a reader reads the newest checkpoint again when training deletes it meanwhile.
READ_ATTEMPTS = 5
# orbax renames a checkpoint it drops (max_to_keep) into this subdirectory, which the next save
# empties: a reader beside a running training then never sees a half-deleted checkpoint (files
# missing, truncated streams), as it can when checkpoints are deleted in place.
DELETED = "deleted"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; ``step`` and ``directory`` name it."""

    def __init__(self, message: str, step: int, directory: str):
        super().__init__(message)
        self.step, self.directory = step, directory


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files do not match its manifest, has none, or fails to restore."""


class CheckpointGoneError(CheckpointError):
    """A checkpoint deleted while it was read (a training run on the workdir keeps only its
    latest ``max_to_keep``)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (e.g. disk full); earlier checkpoints are intact."""


class PopulationCheckpoints:
    """Save and restore a population state under ``directory`` (one subdirectory per step).

    ``read_only=True`` opens the checkpoints of another (possibly running) training for
    reading: nothing is created, cleaned up or moved.
    """

    def __init__(
        self, directory: str, max_to_keep: int = 2, milestone_steps: Iterable[int] = (), read_only: bool = False
    ):
        self.directory = os.path.abspath(directory)
        self.milestone_steps = sorted(set(int(s) for s in milestone_steps))
        self.read_only = read_only
        orbax_noise.silence()
        if read_only:
            self._options = ocp.CheckpointManagerOptions(read_only=True)
        else:
            policy = preservation.AnyPreservationPolicy(
                [preservation.LatestN(max_to_keep), preservation.CustomSteps(self.milestone_steps)]
            )
            # cleanup: a save cut short (killed, disk full) leaves a temporary directory
            self._options = ocp.CheckpointManagerOptions(
                preservation_policy=policy, create=True, cleanup_tmp_directories=True, todelete_subdir=DELETED
            )
        self._pending: int | None = None  # step of the save in flight
        self._failed = False  # a save failed (reported once, as CheckpointWriteError)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        for _ in range(READ_ATTEMPTS):
            try:
                return ocp.CheckpointManager(
                    self.directory, options=self._options, item_handlers=manifest.ChecksummedHandler()
                )
            except FileNotFoundError:  # orbax lists a checkpoint that a training drops meanwhile
                continue
        raise self._still_writing()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending, as on disk now.

        orbax commits a checkpoint by renaming its temporary directory to ``<step>``, and drops
        one by renaming it into :data:`DELETED`: a ``<step>`` directory is a whole checkpoint.
        (orbax's own listing reads each one's metadata, and raised ``FileNotFoundError`` when
        a training dropped one meanwhile.)
        """
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

    def saved_population_size(self, step: int) -> int | None:
        """Leading (padded population) size of the checkpoint at ``step``; None if unreadable."""
        try:
            return int(self._manager.item_metadata(step).tree["step"].shape[0])
        except Exception:  # a damaged checkpoint; verify and restore report it
            return None

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

    # --------------------------------------------------------------------------- reading

    def verify(self, step: int) -> None:
        """Check the files of the checkpoint at ``step`` against its manifest.

        Raises :class:`CheckpointGoneError` if the checkpoint does not exist (any more),
        :class:`DamagedCheckpointError` naming the first file that differs.
        """
        if not os.path.isdir(self.step_dir(step)):
            raise self._gone(step)
        problem = manifest.manifest_problem(os.path.join(self.step_dir(step), manifest.ITEM))
        if problem is not None:
            if not os.path.isdir(self.step_dir(step)):
                raise self._gone(step)
            raise DamagedCheckpointError(
                f"the checkpoint at step {step} in {self.directory} cannot be restored: {problem}", step, self.directory
            )

    def _gone(self, step: int) -> CheckpointGoneError:
        return CheckpointGoneError(
            f"the checkpoint at step {step} in {self.directory} was deleted while it was read "
            "(a training run on this workdir keeps only its latest checkpoints)",
            step,
            self.directory,
        )

    def restore_step(self, step: int, abstract_state: PyTree) -> PyTree:
        """The checkpoint at ``step``, verified, restored onto ``abstract_state``
        (ShapeDtypeStructs with shardings).

        Raises :class:`DamagedCheckpointError` or :class:`CheckpointGoneError`.
        """
        self._verify_on_all_processes(step)
        try:
            state = self._manager.restore(step, args=manifest.ChecksummedRestore(abstract_state))
        except Exception as error:  # orbax raises assorted errors on unreadable files
            orbax_noise.collect_leftovers()
            if not os.path.isdir(self.step_dir(step)):
                raise self._gone(step) from error
            raise DamagedCheckpointError(
                f"the checkpoint at step {step} in {self.directory} cannot be restored: orbax "
                f"failed ({orbax_noise.one_line(error)})",
                step,
                self.directory,
            ) from error
        self._check_own_step(step, state)
        return state

    def _check_own_step(self, step: int, state: PyTree) -> None:
        """:class:`DamagedCheckpointError` on every process unless the restored state is at the
        step its directory names (`checkpoint_manifest.own_step_problem`)."""
        problem = manifest.own_step_problem(state, step)
        if problem is not None:
            raise DamagedCheckpointError(
                f"the checkpoint at step {step} in {self.directory} cannot be restored: {problem}", step, self.directory
            )

    def _verify_on_all_processes(self, step: int) -> None:
        """:meth:`verify` on process 0, its verdict raised on every process (the files are
        read once, and every process decides alike)."""
        if jax.process_count() == 1:
            return self.verify(step)
        from jax.experimental import multihost_utils

        error = None
        if jax.process_index() == 0:
            try:
                self.verify(step)
            except CheckpointError as caught:
                error = caught
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if error is not None:
            raise error
        if failed:
            raise DamagedCheckpointError(
                f"process 0 found the checkpoint at step {step} in {self.directory} damaged", step, self.directory
            )

    def _restore_sized(self, step: int, abstract_for: Callable[[int | None], PyTree]) -> PyTree:
        return self.restore_step(step, abstract_for(self.saved_population_size(step)))

    def restore_latest(self, abstract_state: PyTree | Callable[[int | None], PyTree]) -> tuple[int, PyTree] | None:
        """Newest checkpoint that verifies and restores, as ``(step, state)``; None if none does.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` with shardings, or a function of
        a checkpoint's saved leading size (None if unreadable) that returns one. Every newer
        checkpoint is set aside (moved to ``<directory>.corrupt/``), one log line each: for the
        training that owns ``directory`` (readers use :meth:`read`).
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

    def read(self, abstract_for: Callable[[int | None], PyTree], step: int | None = None) -> tuple[int, PyTree]:
        """Restore ``step`` (default: the newest) for reading, beside a training that may be
        writing and deleting checkpoints; returns ``(step, state)``.

        ``abstract_for``: as in :meth:`restore_latest`. If the newest checkpoint vanishes while
        read, the then newest is read (up to :data:`READ_ATTEMPTS` times).
        Raises :class:`DamagedCheckpointError`, or :class:`CheckpointGoneError` (also when
        there is no checkpoint at ``step``, or none at all).
        """
        for _ in range(READ_ATTEMPTS):
            steps = self.all_steps()
            if not steps or (step is not None and step not in steps):
                at = "" if step is None else f" at step {step}"
                raise CheckpointGoneError(
                    f"{self.directory} holds no checkpoint{at} (kept steps: {steps}); a training "
                    "run keeps only its latest checkpoints and the milestones "
                    "(checkpoint.keep_at_fractions)",
                    -1 if step is None else step,
                    self.directory,
                )
            chosen = steps[-1] if step is None else step
            try:
                return chosen, self._restore_sized(chosen, abstract_for)
            except CheckpointGoneError:
                if step is not None:
                    raise
        raise self._still_writing()

    def _still_writing(self) -> CheckpointGoneError:
        return CheckpointGoneError(
            f"the newest checkpoint in {self.directory} was deleted while it was read, "
            f"{READ_ATTEMPTS} times: training is still writing there; wait for it to finish, or "
            "read a milestone step (checkpoint.keep_at_fractions), which is never deleted",
            -1,
            self.directory,
        )

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
