"""The two copies of a run's config in its workdir (`CONFIG_COPIES`): reading, writing, reading
back the config a run was trained with, and whether the workdir holds a run at all.

The config is kept beside the outputs and with the checkpoints, so that deleting one copy never
lets a run with another config resume (or set aside) these checkpoints. What a config means
(its fields, how two configs differ) is `cka_jax.workdir.config`'s; to `read` a copy is a file
that `parse` turns into a flat dict, or fails to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from cka_jax import _atomic_file as atomic_file
from cka_jax.workdir import CONFIG_COPIES, Workdir
from cka_jax.workdir import config as run_config
from cka_jax.workdir.config import RunConfigError


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
    paths = dict(zip(CONFIG_COPIES, Workdir(workdir).config_copies, strict=True))
    for name, path in paths.items():
        if os.path.lexists(path):
            try:
                copies[name] = parse(path)
            except (OSError, ValueError) as error:
                damaged[name] = error
    if damaged:
        name, problem = next(iter(damaged.items()))
        fix = f"delete it to have it rewritten from {paths[next(iter(copies))]}" if copies else "restore it"
        raise DamagedConfigError(
            f"{paths[name]} is damaged ({problem}); nothing was changed: {fix}, or use another --workdir"
        )
    return copies


def saved_configs(workdir: str) -> dict[str, dict[str, Any]]:
    """The config copies in ``workdir`` (flat dicts) by name in :data:`~cka_jax.workdir.CONFIG_COPIES`,
    missing ones left out; :class:`RunConfigError` for a damaged one."""
    try:
        return read(workdir, run_config.read_flat_config)
    except DamagedConfigError as error:
        raise RunConfigError(str(error)) from error


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with: its config.json, or the copy with its checkpoints.

    Raises ``FileNotFoundError`` if there is neither, :class:`~cka_jax.workdir.config.RunConfigError`
    if one is damaged or the two differ.
    """
    copies = saved_configs(workdir)
    if not copies:
        raise FileNotFoundError(f"workdir {workdir} has no {' or '.join(CONFIG_COPIES)}: it holds no train.py run")
    first, *others = copies.values()
    if any(run_config.config_differences(first, run_config.config_from_flat(o)) for o in others):
        paths = " and ".join(Workdir(workdir).config_copies)
        raise RunConfigError(f"{paths} differ: restore the run's config into both")
    return run_config.config_from_flat(first)


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
