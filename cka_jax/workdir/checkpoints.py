"""A run's checkpoints read back: each verified against its manifest before it is restored, also
beside a training that is writing and deleting them.

Integrity: each checkpoint carries a manifest of its files' sizes and SHA-256
(:mod:`cka_jax.workdir.checkpoint_manifest`), and every restore verifies the files first; a
restored state that records its step (a population's ``TrainState.step``) must be at the step
its directory names (a directory renamed or copied to another step is damaged). A checkpoint
that fails either raises :class:`DamagedCheckpointError`; orbax's own reports of a failure are
dropped (:mod:`cka_jax.workdir.orbax_noise`): each failure is one exception here.

Reading beside a running training: orbax never rewrites a committed file; a checkpoint it
drops (``max_to_keep``) is renamed away at once. A read therefore either sees the verified bytes
or fails because the checkpoint vanished; :meth:`VerifiedCheckpoints.read` then reads the newest
one again (:class:`CheckpointGoneError` when it keeps vanishing or a requested step is gone).

:class:`VerifiedCheckpoints` restores any subtree of the saved state (for analyses: the
parameters and BatchNorm statistics, see :mod:`cka_jax.workdir.trained`), so reading needs no
optimizer. Writing, resuming and setting damaged checkpoints aside are the training's
(:class:`cka_jax.train.checkpoints.PopulationCheckpoints`, built on this class).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cka_jax.workdir import checkpoint_manifest as manifest
from cka_jax.workdir import checkpoint_steps, orbax_noise

PyTree = Any

# How often a reader reads the newest checkpoint again when training deletes it meanwhile.
READ_ATTEMPTS = 5


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


class VerifiedCheckpoints:
    """The checkpoints under ``directory`` (one subdirectory per step), opened for reading:
    nothing is created, cleaned up or moved.

    A restore (:meth:`restore_step`, :meth:`read`) returns the subtree of the saved state that
    its abstract tree names (a dict of the state's fields, e.g. ``{'step', 'params',
    'batch_stats'}``, each a pytree of ``jax.ShapeDtypeStruct`` with shardings); the rest of the
    state is not read.
    """

    def __init__(self, directory: str):
        orbax_noise.silence()  # before orbax's first log line (the options log some)
        self._open_manager(directory, ocp.CheckpointManagerOptions(read_only=True), ocp.PyTreeCheckpointHandler())

    def _open_manager(
        self, directory: str, options: ocp.CheckpointManagerOptions, handler: ocp.CheckpointHandler
    ) -> None:
        self.directory = os.path.abspath(directory)
        self._options, self._handler = options, handler
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        for _ in range(READ_ATTEMPTS):
            try:
                return ocp.CheckpointManager(self.directory, options=self._options, item_handlers=self._handler)
            except FileNotFoundError:  # orbax lists a checkpoint that a training drops meanwhile
                continue
        raise self._still_writing()

    def _restore_args(self, abstract: PyTree) -> ocp.args.CheckpointArgs:
        """orbax's arguments restoring the subtree ``abstract`` of a saved state."""
        return ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
        )

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending, as on disk now
        (:func:`cka_jax.workdir.checkpoint_steps`; orbax's own listing reads each one's
        metadata, and raises ``FileNotFoundError`` when a training drops one meanwhile)."""
        return checkpoint_steps(self.directory)

    def saved_population_size(self, step: int) -> int | None:
        """Leading (padded population) size of the checkpoint at ``step``; None if unreadable."""
        try:
            return int(self._manager.item_metadata(step).tree["step"].shape[0])
        except Exception:  # a damaged checkpoint; verify and restore report it
            return None

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

    def restore_step(self, step: int, abstract: PyTree) -> PyTree:
        """The checkpoint at ``step``, verified, restored onto ``abstract``
        (ShapeDtypeStructs with shardings).

        Raises :class:`DamagedCheckpointError` or :class:`CheckpointGoneError`.
        """
        self._verify_on_all_processes(step)
        try:
            state = self._manager.restore(step, args=self._restore_args(abstract))
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

    def read(self, abstract_for: Callable[[int | None], PyTree], step: int | None = None) -> tuple[int, PyTree]:
        """Restore ``step`` (default: the newest) for reading, beside a training that may be
        writing and deleting checkpoints; returns ``(step, state)``.

        ``abstract_for``: a function of a checkpoint's saved leading size (None if unreadable)
        that returns the abstract tree to restore. If the newest checkpoint vanishes while read,
        the then newest is read (up to :data:`READ_ATTEMPTS` times).
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

    def close(self) -> None:
        self._manager.close()
