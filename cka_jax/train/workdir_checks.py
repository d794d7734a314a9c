"""A training run's claim on its workdir: the lock, refusing a workdir that holds another run,
the config copies, and trimming metrics to the checkpoint a run resumes from. (Reading a
trained workdir back, its saved configs included, is :mod:`cka_jax.workdir`'s:
:mod:`~cka_jax.workdir.config_copies`, :mod:`~cka_jax.workdir.trained`.) With several processes,
process 0 locks, checks and writes; the others share its verdict.

The files are named, written and read by :mod:`cka_jax.workdir`; what makes two configs the same run
(:func:`~cka_jax.workdir.config.config_differences`) is :mod:`cka_jax.workdir.config`'s. Every refusal
is a :class:`~cka_jax.workdir.config.RunConfigError` and leaves the workdir as it was.

A run that ends in an error (or a signal) before it wrote any checkpoint, metric or prediction,
say one refused for its data, trained nothing: :func:`lock_workdir` then removes exactly what
this run created (its config copies, ``population_strategy.json``, the lock file, and the
directories it made if they are empty), so that a corrected command is not refused as "a
different config". Nothing that existed before the run is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from cka_jax.workdir import CONFIG_COPIES, Workdir, config_copies, metrics_log
from cka_jax.workdir import config as run_config
from cka_jax.workdir import lock as workdir_lock
from cka_jax.workdir.config import RunConfigError
from cka_jax.workdir.config_copies import saved_configs


def _check_is_directory(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunConfigError(f"--workdir {workdir} is a file, not a directory; use another --workdir")


# Bytes of a refusal's message that process 0 sends the other processes (longer ones are cut).
MESSAGE_BYTES = 4096


def _broadcast_text(text: str) -> str:
    """Process 0's ``text`` on every process (a collective: every process calls it)."""
    from jax.experimental import multihost_utils

    buffer = np.zeros(MESSAGE_BYTES, np.uint8)
    encoded = text.encode("utf-8")[:MESSAGE_BYTES]
    buffer[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return bytes(received).rstrip(b"\0").decode("utf-8", "replace")


def _on_process_0(check: Callable[[], None]) -> None:
    """Run ``check`` on process 0 only and raise its :class:`RunConfigError` on every process, so
    that all processes go on or stop together (a collective when there are several)."""
    if jax.process_count() == 1:
        return check()
    refusal = ""
    if jax.process_index() == 0:
        try:
            check()
        except RunConfigError as error:
            refusal = str(error)
    refusal = _broadcast_text(refusal)
    if refusal:
        raise RunConfigError(refusal)


def _setup_files(workdir: str) -> tuple[str, ...]:
    """The files a run writes before its first checkpoint, in the order they are removed when it
    trained nothing."""
    files = Workdir(workdir)
    return (files.population_strategy, files.checkpoint_config, files.config)


def _setup_paths(workdir: str) -> tuple[str, ...]:
    """What a run may create before its first checkpoint: :func:`_setup_files`, the lock file,
    the checkpoint directory and the workdir itself."""
    files = Workdir(workdir)
    return (*_setup_files(workdir), files.lock, files.checkpoints, workdir)


def _remove_created(workdir: str, existed: set[str]) -> None:
    """Remove what this run created in ``workdir`` before its first checkpoint (the paths of
    :func:`_setup_paths` that are not in ``existed``), but the lock file and the workdir."""
    for path in _setup_files(workdir):
        if path not in existed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    checkpoints = Workdir(workdir).checkpoints
    if checkpoints not in existed:
        with contextlib.suppress(OSError):  # not empty: orbax left something; it blocks nothing
            os.rmdir(checkpoints)


@contextlib.contextmanager
def lock_workdir(workdir: str) -> Iterator[None]:
    """Hold ``workdir``'s lock (:mod:`cka_jax.workdir.lock`) while the body runs. Creates the
    workdir. :class:`RunConfigError` if another run holds it or it cannot be created or written.

    When the body raises (a refusal, an error, a signal's exit) and the workdir holds no run
    (no checkpoint, metrics or predictions), what this run created is removed: the config
    copies, ``population_strategy.json``, the checkpoint directory if empty, the lock file, and
    the workdir if it is left empty (module docstring).

    Several processes: process 0 holds the lock for all of them (the others share its run) and
    every process raises its refusal.
    """
    held: list[workdir_lock.WorkdirLock] = []
    existed: set[str] = set()

    def acquire() -> None:
        _check_is_directory(workdir)
        existed.update(path for path in _setup_paths(workdir) if os.path.lexists(path))
        try:
            held.append(workdir_lock.acquire(workdir))
        except workdir_lock.WorkdirBusyError as error:
            raise RunConfigError(str(error)) from error
        except OSError as error:
            raise RunConfigError(f"cannot create or write --workdir {workdir} ({error})") from error

    _on_process_0(acquire)
    trained_nothing = False
    try:
        yield
    except BaseException:
        trained_nothing = bool(held) and not config_copies.holds_run(workdir)
        if trained_nothing:
            with contextlib.suppress(OSError):  # never hide why the run failed
                _remove_created(workdir, existed)
        raise
    finally:
        for lock in held:
            lock.release(remove=trained_nothing and Workdir(workdir).lock not in existed)
        if held and trained_nothing and workdir not in existed:
            with contextlib.suppress(OSError):  # not empty: something else is there; keep it
                os.rmdir(workdir)


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuse a workdir holding another run, then write the config's copies.

    Refused (:class:`RunConfigError`, nothing written): a file; a damaged copy; a copy that differs
    from ``config`` outside :data:`~cka_jax.workdir.config.RESUMABLE_FIELDS`; a run (checkpoints,
    metrics, predictions) with neither copy. A missing copy is restored.

    Several processes: process 0 checks and writes, then every process checks that it sees the
    copies process 0 wrote (the workdir must be storage they all share); a refusal is raised on
    every process.
    """
    _on_process_0(lambda: _check_and_write(workdir, config))
    if jax.process_count() > 1:
        _check_shared(workdir, config)


def _check_and_write(workdir: str, config: ml_collections.ConfigDict) -> None:
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
    try:
        config_copies.write(workdir, run_config.flat_config(config))
    except OSError as error:
        raise RunConfigError(f"cannot write to --workdir {workdir} ({error})") from error


def _check_shared(workdir: str, config: ml_collections.ConfigDict) -> None:
    """:class:`RunConfigError` on every process unless every process was given process 0's
    config (every field; the first difference found is named, with both values) and sees the
    config copies that process 0 wrote (collectives)."""
    from jax.experimental import multihost_utils

    def broadcast(data: bytes, source: int) -> bytes:  # any length, from process `source`
        is_source = jax.process_index() == source
        size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data)), is_source=is_source))
        buffer = np.frombuffer(data, np.uint8) if is_source else np.zeros(size, np.uint8)
        return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer, is_source=is_source)))

    mine = run_config.flat_config(config)
    reference = json.loads(broadcast(json.dumps(mine).encode(), 0))  # process 0's config
    differs = np.asarray(multihost_utils.process_allgather(np.int32(mine != reference))).reshape(-1)
    if differs.any():
        other = int(np.flatnonzero(differs)[0])
        theirs = json.loads(broadcast(json.dumps(mine).encode(), other))
        diffs = [
            f"{n}: {reference.get(n, '<absent>')!r} on process 0, {theirs.get(n, '<absent>')!r} on process {other}"
            for n in sorted(set(reference) | set(theirs))
            if reference.get(n) != theirs.get(n)
        ]
        raise RunConfigError(
            f"process {other} of {jax.process_count()} was given a different config from process 0's; every "
            "process must run the same command (config file and --config flags). Differences: " + "; ".join(diffs)
        )
    try:
        copies = saved_configs(workdir)
        sees = len(copies) == len(CONFIG_COPIES) and not any(
            run_config.config_differences(saved, config) for saved in copies.values()
        )
    except RunConfigError:
        sees = False
    seen = np.asarray(multihost_utils.process_allgather(np.int32(sees))).reshape(-1)
    blind = np.flatnonzero(seen == 0).tolist()
    if blind:
        raise RunConfigError(
            f"process(es) {', '.join(map(str, blind))} of {jax.process_count()} do not see the config "
            f"copies that process 0 wrote into --workdir {workdir}: every process must see the same "
            "workdir (a shared file system mounted at the same path)"
        )


def truncate_metrics(workdir: str, max_step: int) -> None:
    """Drop metric rows past ``max_step`` (written after the checkpoint a run resumes from) and a
    torn last line; called before the run appends anything."""
    if jax.process_index() == 0:
        try:
            metrics_log.truncate(Workdir(workdir).metrics, max_step)
        except ValueError as error:  # damaged before its last line: not ours to repair
            raise RunConfigError(
                f"{error}; move it aside to resume (the run rewrites its rows "
                "from the checkpoint on), or use another --workdir"
            ) from error
