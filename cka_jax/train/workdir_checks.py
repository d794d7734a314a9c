"""A training run's claim on its workdir: the lock, refusing a workdir that holds another run,
the config copies, and trimming metrics to the checkpoint a run resumes from. (Reading a
trained workdir back is :mod:`cka_jax.train.trained`.)

The files are named and written by :mod:`cka_jax.workdir`; what makes two configs the same run
(:func:`~cka_jax.train.config.config_differences`) is :mod:`cka_jax.train.config`'s. Every refusal
is a :class:`~cka_jax.train.run_checks.RunConfigError` and leaves the workdir as it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from cka_jax.train import config as run_config
from cka_jax.train.run_checks import RunConfigError
from cka_jax.workdir import CONFIG_COPIES, config_copies, metrics_log
from cka_jax.workdir import lock as workdir_lock


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


def saved_configs(workdir: str) -> dict[str, dict[str, Any]]:
    """The config copies in ``workdir`` (flat dicts) by name in :data:`~cka_jax.workdir.CONFIG_COPIES`,
    missing ones left out; :class:`RunConfigError` for a damaged one."""
    try:
        return config_copies.read(workdir, run_config.read_flat_config)
    except config_copies.DamagedConfigError as error:
        raise RunConfigError(str(error)) from error


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuse a workdir holding another run, then write the config's copies.

    Refused (:class:`RunConfigError`, nothing written): a file; a damaged copy; a copy that differs
    from ``config`` outside :data:`~cka_jax.train.config.RESUMABLE_FIELDS`; a run (checkpoints,
    metrics, predictions) with neither copy. A missing copy is restored.
    """
    _check_is_directory(workdir)
    copies = saved_configs(workdir)
    for name, saved in copies.items():
        diffs = run_config.config_differences(saved, config)
        if diffs:
            raise RunConfigError(
                f"workdir {workdir} holds a run with a different config (its {name}); "
                "use another --workdir or the same config. Differences: " + "; ".join(diffs)
            )
    if not copies and config_copies.holds_run(workdir):
        raise RunConfigError(
            f"workdir {workdir} holds a run (checkpoints, metrics or predictions) but neither of its "
            f"config copies ({' and '.join(CONFIG_COPIES)}), so nothing tells whether it is this "
            "run: restore one of them, or use another --workdir"
        )
    if jax.process_index() == 0:
        try:
            config_copies.write(workdir, run_config.flat_config(config))
        except OSError as error:
            raise RunConfigError(f"cannot write to --workdir {workdir} ({error})") from error


def truncate_metrics(workdir: str, max_step: int) -> None:
    """Drop metric rows past ``max_step`` (written after the checkpoint a run resumes from) and a
    torn last line; called before the run appends anything."""
    if jax.process_index() == 0:
        try:
            metrics_log.truncate(metrics_log.path_in(workdir), max_step)
        except ValueError as error:  # damaged before its last line: not ours to repair
            raise RunConfigError(
                f"{error}; move it aside to resume (the run rewrites its rows "
                "from the checkpoint on), or use another --workdir"
            ) from error
