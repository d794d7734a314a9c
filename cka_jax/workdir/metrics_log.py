"""A workdir's metrics.jsonl: one JSON object per line, appended once per (epoch, model).

Lines are strict JSON: a non-finite number (a diverged model's loss) is written as `null`, never
as bare NaN/Infinity, so any JSON reader can load the file. A crash in the middle of an append
leaves a torn last line; `read` drops it with a warning and `truncate` rewrites the file without
it, so a torn tail never blocks a resume or an analysis.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from cka_jax import _atomic_file as atomic_file

logger = logging.getLogger(__name__)


def _strict(value: Any) -> Any:
    """float('nan'/'inf') -> None; everything else unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def encode(row: Mapping[str, Any]) -> str:
    """One metrics row as a line of strict JSON (non-finite numbers become null)."""
    return json.dumps({k: _strict(v) for k, v in row.items()}, allow_nan=False) + "\n"


def _parse(path: str) -> tuple[list[dict[str, Any]], bool]:
    """Rows of `path` and whether its last line was torn (dropped). A bad line before the last raises
    ValueError naming the line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    rows, torn = [], False
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as error:
            if i == last:
                torn = True
                break
            raise ValueError(
                f"{path}, line {i + 1}: not a metrics row ({error}); the file is damaged before its last line"
            ) from error
        rows.append(row)
    return rows, torn


def read(path: str) -> list[dict[str, Any]]:
    """Every complete row of `path` ([] if it does not exist); a torn last line is dropped with a
    warning. Non-finite values read back as None."""
    if not os.path.exists(path):
        return []
    rows, torn = _parse(path)
    if torn:
        logger.warning("%s: dropped a torn last line (a run stopped in the middle of writing it)", path)
    return rows


def _end_torn_tail(f) -> None:
    """Before appending to `f` (opened "r+b"): a last line without its newline is completed if it
    is a whole row, else cut off, so that a torn line never ends up inside the file."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    start = size
    while start > 0:  # back to the previous newline, a block at a time
        block = min(start, 1 << 16)
        f.seek(start - block)
        newline = f.read(block).rfind(b"\n")
        if newline >= 0:
            start = start - block + newline + 1
            break
        start -= block
    f.seek(start)
    try:
        whole = isinstance(json.loads(f.read()), dict)
    except ValueError:
        whole = False
    if whole:
        f.write(b"\n")
    else:
        logger.warning("%s: dropped a torn last line (a run stopped in the middle of writing it)", f.name)
        f.truncate(start)


def append(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Appends `rows` as complete lines, flushed to disk before returning (a torn last line left by
    a crash is dropped first)."""
    text = "".join(encode(row) for row in rows).encode("utf-8")
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        _end_torn_tail(f)
        f.seek(0, os.SEEK_END)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def truncate(path: str, max_step: int) -> None:
    """Rewrites `path` (atomically) without rows past `max_step` and without a torn last line."""
    if not os.path.exists(path):
        return
    rows = [row for row in read(path) if row.get("step", 0) <= max_step]
    atomic_file.write(path, "".join(encode(row) for row in rows))
