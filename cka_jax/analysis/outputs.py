"""Atomic output files (temp file + rename), so a failed analysis never leaves a half-written or
deleted output behind, and the report section each analysis hands to `cka_jax.analysis.report`."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import numpy as np

from cka_jax import _atomic_file as atomic_file
from cka_jax.analysis.undefined import strict_json


def _atomic(path: str, write: Callable[[IO[bytes]], Any]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_file.write(path, write)
    return path


def write_npz(path: str, **arrays: Any) -> str:
    """Writes `arrays` to the .npz file `path` atomically; returns `path`."""

    def write(f: IO[bytes]) -> None:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]

    return _atomic(path, write)


def write_json(path: str, value: Any) -> str:
    """Writes `value` (numpy scalars and arrays allowed) as indented strict JSON atomically: an
    undefined (non-finite) number is written as null; say why in a field beside it."""
    text = json.dumps(strict_json(value), indent=2, default=_to_builtin, allow_nan=False)
    return _atomic(path, lambda f: f.write(text.encode()))


def check_writable_directory(path: str) -> None:
    """Raises OSError unless `path` is, or can be created as, a directory we can write files in.
    Leaves nothing behind: directories it creates to find out are removed again."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{existing} is not a directory")
    probe = tempfile.mkdtemp(dir=existing, prefix=".tmp-")
    try:
        with open(os.path.join(probe, "probe"), "wb") as f:
            f.write(b"0")
    finally:  # also when a stop signal interrupts the probe: nothing is left, and its error stays
        shutil.rmtree(probe, ignore_errors=True)


def write_text(path: str, text: str) -> str:
    return _atomic(path, lambda f: f.write(text.encode()))


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def save_figure(fig, path_stem: str) -> list[str]:
    """Saves a matplotlib figure as `<path_stem>.png` and `.pdf` atomically and returns the two
    paths. A figure that pyplot manages is closed (the analyses' own figures are not pyplot's)."""
    paths = []
    for ext, dpi in (("png", 130), ("pdf", None)):
        path = f"{path_stem}.{ext}"
        paths.append(_atomic(path, functools.partial(fig.savefig, format=ext, dpi=dpi, bbox_inches="tight")))
    if fig.canvas.manager is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return paths


@dataclasses.dataclass
class Table:
    """A small table for the report: `header` (K,) and `rows` of K cells each."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclasses.dataclass
class Section:
    """One analysis's part of the report.

    figures: PNG paths relative to the analysis directory. numbers: relative paths of the
    .npz/.json files holding the analysis's numbers.
    """

    name: str
    title: str
    text: str
    figures: list[str] = dataclasses.field(default_factory=list)
    tables: list[Table] = dataclasses.field(default_factory=list)
    numbers: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Section:
        tables = [Table(**t) for t in value.get("tables", [])]
        return cls(**{**value, "tables": tables})
