"""The two copies of a run's config in its workdir (`CONFIG_COPIES`): reading, writing, and
whether the workdir holds a run at all.

The config is kept beside the outputs and with the checkpoints, so that deleting one copy never
lets a run with another config resume (or set aside) these checkpoints. What a config means
(its fields, how two configs differ) is the training layer's; here a copy is a file that
`parse` turns into a flat dict, or fails to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from cka_jax import _atomic_file as atomic_file
from cka_jax.workdir import CONFIG_COPIES, Workdir


class DamagedConfigError(ValueError):
    """A config copy that exists but cannot be read or parsed; nothing was changed."""


def read(workdir: str, parse: Callable[[str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The copies present in `workdir`, parsed by `parse(path)`, by their name in `CONFIG_COPIES`
    (missing ones left out).

    Raises DamagedConfigError naming the first copy that `parse` refuses (OSError or ValueError),
    and what to do about it.
    """
    copies: dict[str, dict[str, Any]] = {}
    damaged: dict[str, Exception] = {}
    for name, path in zip(CONFIG_COPIES, Workdir(workdir).config_copies, strict=True):
        if os.path.lexists(path):
            try:
                copies[name] = parse(path)
            except (OSError, ValueError) as error:
                damaged[name] = error
    if damaged:
        name, problem = next(iter(damaged.items()))
        fix = (
            f"delete it to have it rewritten from {os.path.join(workdir, next(iter(copies)))}"
            if copies
            else "restore it"
        )
        path = os.path.join(workdir, name)
        raise DamagedConfigError(f"{path} is damaged ({problem}); nothing was changed: {fix}, or use another --workdir")
    return copies


def write(workdir: str, flat: dict[str, Any]) -> None:
    """Write `flat` (a JSON-ready flat config) into both copies, each atomically; OSError if the
    workdir cannot be written."""
    text = json.dumps(flat, indent=2, sort_keys=True, allow_nan=False)
    for path in Workdir(workdir).config_copies:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_file.write(path, text)


def holds_run(workdir: str) -> bool:
    """Whether `workdir` holds outputs of a run: checkpoints, metrics or predictions."""
    files = Workdir(workdir)
    if os.path.isdir(files.checkpoints) and any(name.isdigit() for name in os.listdir(files.checkpoints)):
        return True
    return any(os.path.exists(path) for path in (files.metrics, files.predictions_dir))
