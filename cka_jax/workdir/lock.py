"""An exclusive lock on a workdir, so that two training runs never write into one.

The lock is ``fcntl.flock`` on ``<workdir>/.lock``, which holds the holder's pid and host. The
kernel releases a flock when its holder exits in any way (kill -9 included), so a lock file left
behind by a dead run never blocks the next one. Each :func:`acquire` opens the file anew, and
flock refuses a second open file even within the process that holds the lock, so a second run
in the same process is refused too. flock is local to one machine: on a network file system
two hosts are not kept apart.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket

from cka_jax.workdir import Workdir


class WorkdirBusyError(RuntimeError):
    """Another run (in another process, or in this one) holds the workdir's lock."""


@dataclasses.dataclass
class WorkdirLock:
    """A held lock; :meth:`release` it once."""

    fd: int

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    return text or "another process"


def acquire(workdir: str) -> WorkdirLock:
    """Lock ``workdir`` (created if missing).

    Raises :class:`WorkdirBusyError` naming the holder, or ``OSError`` if the workdir cannot be
    created or written.
    """
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(Workdir(workdir).lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirBusyError(
            f"workdir {workdir} is in use by {holder}; wait until that run ends or use another --workdir"
        ) from None
    except OSError:
        os.close(fd)  # also releases the flock
        raise
    return WorkdirLock(fd)
