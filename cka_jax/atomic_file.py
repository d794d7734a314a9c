"""Files replaced whole: a crash leaves either the old file or the new one, never a part of the
new one (written beside it under a unique `.tmp-*` name, flushed to disk, then renamed; removed
if writing fails)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO, Any


def write(path: str, content: str | Callable[[IO[bytes]], Any]) -> None:
    """Replace ``path`` by ``content``: a text (written as UTF-8), or a function that writes the
    bytes into the file it is given (e.g. ``lambda f: np.savez(f, x=x)``)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
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
