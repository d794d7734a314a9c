"""Selecting layer representations by a capture spec, and validating block names for deletion.

A capture spec is a preset (CAPTURE_PRESETS: "all", "blocks", "pre_and_post"; see
`cka_jax.models`), a glob over layer names (``fnmatch``, e.g. ``"stage3/*/post_residual"``), an
exact layer name, or a tuple of these (their union). Selected layers keep network order.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import jax

#: A capture spec: a preset, a glob or name over layer names, or a tuple of these (their union).
CaptureSpec = str | tuple[str, ...]

_PRESETS = {
    "all": lambda name: True,
    "blocks": lambda name: name == "stem" or name.endswith("/post_residual"),
    "pre_and_post": lambda name: name == "stem" or name.endswith(("/pre_residual", "/post_residual")),
}
#: The preset capture specs: "all", "blocks" (stem and block outputs), "pre_and_post".
CAPTURE_PRESETS: tuple[str, ...] = tuple(_PRESETS)


def _matches(pattern: str, name: str) -> bool:
    if pattern in _PRESETS:
        return _PRESETS[pattern](name)
    return fnmatch.fnmatchcase(name, pattern)


def _patterns(capture: CaptureSpec) -> tuple[str, ...]:
    patterns = (capture,) if isinstance(capture, str) else tuple(capture)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"capture must be a string or a non-empty tuple of strings, got {capture!r}")
    return patterns


def check_capture(capture: CaptureSpec, layer_names: Sequence[str]) -> None:
    """Raises ValueError unless every pattern in `capture` matches at least one of `layer_names`."""
    for pattern in _patterns(capture):
        if not any(_matches(pattern, name) for name in layer_names):
            raise ValueError(
                f"capture pattern {pattern!r} matches no layer; use a preset {CAPTURE_PRESETS}, a glob, "
                f"or one of the layer names {tuple(layer_names)}"
            )


def select_names(capture: CaptureSpec, layer_names: Iterable[str]) -> tuple[str, ...]:
    """The names in `layer_names` that match `capture`, in their order."""
    patterns = _patterns(capture)
    return tuple(name for name in layer_names if any(_matches(p, name) for p in patterns))


def select(capture: CaptureSpec, activations: Mapping[str, jax.Array]) -> OrderedDict[str, jax.Array]:
    """The activations whose names match `capture`, in the order of `activations`.

    An OrderedDict, so the order survives jit, vmap and other pytree transformations (a plain
    dict is flattened in sorted key order).
    """
    return OrderedDict((name, activations[name]) for name in select_names(capture, activations))


def check_skip_blocks(skip_blocks: str | Iterable[str], block_names: Sequence[str], residual: bool) -> frozenset[str]:
    """The set of blocks to delete; ValueError for unknown names or deletion without residuals."""
    skip = frozenset((skip_blocks,) if isinstance(skip_blocks, str) else skip_blocks)
    if skip and not residual:
        raise ValueError(
            "skip_blocks needs residual=True: deleting a block keeps only its shortcut, and a network "
            f"without skip connections has none (got skip_blocks={tuple(sorted(skip))})"
        )
    unknown = sorted(skip - set(block_names))
    if unknown:
        raise ValueError(f"unknown block name(s) {unknown} in skip_blocks; blocks are {tuple(block_names)}")
    return skip
