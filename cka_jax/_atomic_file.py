"""Files replaced whole: a crash leaves either the old file or the new one, never a part of the
new one (written beside it under a unique `.tmp-*` name, flushed to disk, then renamed; removed
if writing fails).

The new file gets the mode any file created here would get, ``0o666`` less the process's umask
(0o644 under umask 022, 0o640 under 027), like the files orbax and ``open`` create, not the 0o600
of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import IO, Any

# O_EXCL: a name another writer holds is never reused; the kernel applies the umask to MODE.
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
MODE = 0o666


def _create_beside(path: str) -> tuple[int, str]:
    """An open, new, empty file in ``path``'s directory: ``(fd, its path)``."""
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    while True:
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(tmp, _FLAGS, MODE), tmp
        except FileExistsError:
            continue


def write(path: str, content: str | Callable[[IO[bytes]], Any]) -> None:
    """Replace ``path`` by ``content``: a text (written as UTF-8), or a function that writes the
    bytes into the file it is given (e.g. ``lambda f: np.savez(f, x=x)``)."""
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
