"""An exclusive lock on a workdir, so that two training runs never write into one.

The lock is ``fcntl.flock`` on ``<workdir>/.lock``, which holds the holder's pid and host. The
kernel releases a flock when its holder exits in any way (kill -9 included), so a lock file left
behind by a dead run never blocks the next one. Each :func:`acquire` opens the file anew, and
flock refuses a second open file even within the process that holds the lock, so a second run
in the same process is refused too. flock is local to one machine: on a network file system
two hosts are not kept apart.

A run that trained nothing removes the lock file it created (:meth:`WorkdirLock.release` with
``remove=True``), while it still holds the lock: :func:`acquire` checks, once it holds a lock,
that the file it locked is still the one at ``<workdir>/.lock``, and otherwise tries again, so
two runs never hold one workdir through two lock files. The file is created with mode
``0o666`` less the umask, like every other file of the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket

from cka_jax.workdir import Workdir


class WorkdirBusyError(RuntimeError):
    """Another run (in another process, or in this one) holds the workdir's lock."""


# How often acquire tries again when the lock file it locked was removed meanwhile.
ATTEMPTS = 100


@dataclasses.dataclass
class WorkdirLock:
    """A held lock on the file ``path``; :meth:`release` it once."""

    fd: int
    path: str = ""

    def release(self, remove: bool = False) -> None:
        """Unlock; ``remove``: delete the lock file first (it was created by this run, which
        leaves nothing behind)."""
        if remove and self.path:
            with contextlib.suppress(OSError):  # gone already, or not ours to remove: it blocks nothing
                os.unlink(self.path)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _still_named(fd: int, path: str) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not removed or replaced)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    return text or "another process"


def acquire(workdir: str) -> WorkdirLock:
    """Lock ``workdir`` (created if missing).

    Raises :class:`WorkdirBusyError` naming the holder, or ``OSError`` if the workdir cannot be
    created or written.
    """
    path = Workdir(workdir).lock
    for _ in range(ATTEMPTS):
        os.makedirs(workdir, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # a run that created the workdir removed it meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _still_named(fd, path):  # its holder removed it before letting go
                os.close(fd)
                continue
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
        return WorkdirLock(fd, path)
    raise OSError(f"{path} was removed {ATTEMPTS} times while this run tried to lock it")
