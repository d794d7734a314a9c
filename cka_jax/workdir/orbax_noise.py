"""orbax's failures reported once: its own log lines and its abandoned tasks' reports dropped
(:func:`silence`), leftovers collected at once (:func:`collect_leftovers`), and an orbax error as
one line (:func:`one_line`, :func:`is_disk_full`).

Every failure these reports describe reaches the caller as one
:class:`~cka_jax.workdir.checkpoints.CheckpointError`.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import sys
import warnings

import orbax.checkpoint as ocp

_ORBAX_PATH = os.path.dirname(ocp.__file__) + os.sep
# Text of reports that come from orbax's reads and writes (TensorStore's errors name neither).
_NOISE_MARKS = (_ORBAX_PATH, "Event loop is closed", "OCDBT", "TensorStore")
_NOISE_LOGGERS = ("absl", "asyncio")  # orbax logs through absl; asyncio reports its leftover tasks


def _is_orbax_noise(text: str, traceback) -> bool:
    """Whether an error report comes from orbax: raised in its code, about its TensorStore
    files, or the "Event loop is closed" of callbacks that finish after the event loop of a
    failed read or write was closed."""
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename.startswith(_ORBAX_PATH):
            return True
        traceback = traceback.tb_next
    return any(mark in text for mark in _NOISE_MARKS)


class _DropOrbaxNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(_ORBAX_PATH):
            return False
        traceback = record.exc_info[2] if record.exc_info else None
        return not _is_orbax_noise(record.getMessage(), traceback)


_DROP_ORBAX_NOISE = _DropOrbaxNoise()


def silence() -> None:
    """Drop, from now on in this process, orbax's own log lines and the reports of its abandoned
    tasks (asyncio's "exception was never retrieved", unraisable "Event loop is closed"): every
    failure they describe reaches the caller as one ``CheckpointError``. Without this a damaged
    checkpoint or a full disk prints thousands of lines of TensorStore specs and tracebacks, and
    the leftover tasks of a failed read are collected at any later time, up to interpreter exit."""
    for name in _NOISE_LOGGERS:
        if _DROP_ORBAX_NOISE not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_DROP_ORBAX_NOISE)
    if not getattr(sys.unraisablehook, "drops_orbax_noise", False):
        sys.unraisablehook = _unraisablehook_without_orbax_noise(sys.unraisablehook)


def _unraisablehook_without_orbax_noise(previous):
    def unraisablehook(unraisable) -> None:
        text = f"{unraisable.exc_value} {unraisable.object!r}"
        if not _is_orbax_noise(text, unraisable.exc_traceback):
            previous(unraisable)

    unraisablehook.drops_orbax_noise = True  # type: ignore[attr-defined]
    return unraisablehook


def collect_leftovers() -> None:
    """Collect the tasks a failed orbax read or write abandoned now, while their reports are
    dropped, rather than at some later point (their "coroutine ... was never awaited" warnings
    surfaced in unrelated code)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        gc.collect()


def one_line(error: BaseException) -> str:
    """``Type: message`` of the error's root cause on one line, without TensorStore's spec dump,
    at most 200 characters."""
    while error.__cause__ is not None:  # orbax wraps TensorStore's error, which says what failed
        error = error.__cause__
    text = " ".join(str(error).split("See full TensorStore details")[0].split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` or an error it was raised from says the disk is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):  # TensorStore's errors are not OSErrors
            return True
        error = error.__cause__ or error.__context__
    return False
