"""A checkpoint's integrity manifest: the size and SHA-256 of every file orbax wrote for it.

Process 0 writes :data:`MANIFEST` in orbax's finalize step (:class:`ChecksummedHandler`), after
every process has written its shards and before orbax commits the checkpoint (renames it into
place), so a committed checkpoint always has its manifest: one without (older cka_jax, or a
removed manifest) cannot be verified and is not used. :func:`manifest_problem` says why the files
of a checkpoint cannot be trusted, or None; :func:`own_step_problem` why a restored state is not
the state of the step its directory names.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cka_jax import _atomic_file as atomic_file

MANIFEST = "cka_jax_manifest.json"  # in the item directory: <step>/default/
ITEM = "default"  # orbax's directory of a single-item checkpoint
# Written by orbax after finalize (it holds the commit time), so outside the manifest.
_COMMIT_MARKER = "commit_success.txt"


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(item_dir: str) -> dict[str, str]:
    """Relative path → absolute path of every file of a checkpoint item but the manifest and
    orbax's commit marker."""
    out = {}
    for root, _, names in os.walk(item_dir):
        for name in names:
            if name not in (MANIFEST, _COMMIT_MARKER):
                path = os.path.join(root, name)
                out[os.path.relpath(path, item_dir)] = path
    return out


def write_manifest(item_dir: str) -> None:
    """Record size and SHA-256 of every file under ``item_dir`` in ``item_dir/MANIFEST``."""
    files = {
        rel: {"bytes": os.path.getsize(path), "sha256": _digest(path)} for rel, path in sorted(_files(item_dir).items())
    }
    atomic_file.write(os.path.join(item_dir, MANIFEST), json.dumps({"format": 1, "files": files}, indent=1))


def manifest_problem(item_dir: str) -> str | None:
    """Why the files under ``item_dir`` cannot be trusted (e.g. "file default/... differs from
    its recorded checksum"); None if they all match.

    Files the manifest does not list are ignored: every file a restore reads is reached from a
    listed one (orbax's metadata and OCDBT manifests), so they cannot change what it reads.
    """
    try:
        with open(os.path.join(item_dir, MANIFEST)) as f:
            recorded = json.load(f)["files"]
    except FileNotFoundError:
        return (
            f"it has no checksum manifest {ITEM}/{MANIFEST}, so it cannot be verified "
            "(written by an older cka_jax, or the manifest was removed)"
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its checksum manifest {ITEM}/{MANIFEST} is unreadable ({error})"
    for rel, expected in sorted(recorded.items()):
        path = os.path.join(item_dir, rel)
        name = f"{ITEM}/{rel}"
        try:
            size = os.path.getsize(path)
            if size != expected["bytes"]:
                return f"file {name} has {size} bytes, {expected['bytes']} were written"
            if _digest(path) != expected["sha256"]:
                return f"file {name} differs from its recorded checksum (it is damaged)"
        except FileNotFoundError:
            return f"file {name} is missing"
    return None


def own_step_problem(state: Any, step: int) -> str | None:
    """Why a restored ``state`` is not the state of ``step`` (its ``step`` field, every model's, on
    every process, differs: a checkpoint directory renamed or copied to another step), or None.
    A state without a ``step`` field is not checked."""
    own = _own_steps(state)
    if own is None:
        return None
    low, high = (int(own.min()), int(own.max())) if own.size else (step, step)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(np.array([low, -high], np.int64)))
        low, high = int(gathered[..., 0].min()), -int(gathered[..., 1].min())
    if low == high == step:
        return None
    found = f"step {low}" if low == high else f"steps {low} to {high}"
    return f"its state is at {found}, not {step} (its directory was renamed or copied from another step)"


def _own_steps(state: Any) -> np.ndarray | None:
    """The values of ``state``'s ``step`` field (an attribute, or a mapping's key) in this
    process's shards, flat; None if it has no such field."""
    step = state.get("step") if isinstance(state, dict) else getattr(state, "step", None)
    if step is None:
        return None
    shards = getattr(step, "addressable_shards", None)
    parts = [np.asarray(shard.data) for shard in shards] if shards is not None else [np.asarray(step)]
    return np.concatenate([part.reshape(-1) for part in parts]).astype(np.int64)


class ChecksummedHandler(ocp.StandardCheckpointHandler):
    """orbax's standard handler that writes :data:`MANIFEST` when it finalizes a save.

    orbax calls ``finalize`` on the primary process only, after every process has written its
    shards, on the not yet committed item directory: the manifest covers every process's files
    and is committed with them.
    """

    def finalize(self, directory) -> None:
        super().finalize(directory)
        write_manifest(os.fspath(directory))


@ocp.args.register_with_handler(ChecksummedHandler, for_save=True)
class ChecksummedSave(ocp.args.StandardSave):
    """orbax's StandardSave, routed to :class:`ChecksummedHandler`."""


@ocp.args.register_with_handler(ChecksummedHandler, for_restore=True)
class ChecksummedRestore(ocp.args.StandardRestore):
    """orbax's StandardRestore, routed to :class:`ChecksummedHandler`."""
