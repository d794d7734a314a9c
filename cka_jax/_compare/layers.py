"""Choosing layers by exact name or glob, and checking their shapes batch after batch.

A layer is measurable when its activation is (batch, ...) (or (models, batch, ...) in
population mode) for the batch's examples; ``(batch,)`` counts as one feature. Selections keep
the model's own (network) order, whatever the order of the patterns.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import numpy as np

LayerSpec = str | Sequence[str] | None


def patterns(spec: LayerSpec, label: str) -> tuple[str, ...] | None:
    """None (every layer) or the patterns of `spec`; ValueError for anything but strings."""
    if spec is None:
        return None
    found = (spec,) if isinstance(spec, str) else tuple(spec) if isinstance(spec, (list, tuple)) else None
    if not found or not all(isinstance(p, str) for p in found):
        raise ValueError(f"layers_{label[-1]} must be a layer name, a glob, or a list of them, got {spec!r}")
    return found


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or fnmatch.fnmatchcase(name, pattern)


def select(
    shapes: Mapping[str, tuple[int, ...]], spec: LayerSpec, label: str, lead: int, examples: int | None
) -> tuple[str, ...]:
    """Names of `shapes` (name -> activation shape, network order) that `spec` selects.

    lead: 1, or 2 with a model axis; examples: the batch size every selected layer must carry on
    axis lead - 1, or None (activation streams: any size here, `ShapeCheck` compares them).
    Unmeasurable layers are left out of globs and of the default (every layer); naming one
    exactly, or a pattern that matches nothing, is a ValueError.
    """
    chosen = patterns(spec, label)
    measurable = [name for name, shape in shapes.items() if len(shape) >= lead and examples in (None, shape[lead - 1])]
    if chosen is None:
        if not measurable:
            raise ValueError(
                f"{label} has no layer with a leading batch axis of {examples} examples; its layers: {_listing(shapes)}"
            )
        return tuple(measurable)
    for pattern in chosen:
        if pattern in shapes and pattern not in measurable:
            raise ValueError(
                f"{label} layer {pattern!r} has shape {shapes[pattern]}: it needs a batch axis "
                f"{'(models, batch, ...)' if lead == 2 else '(batch, ...)'}"
                + ("" if examples is None else f" of the batch's {examples} examples")
            )
        if not any(_matches(pattern, name) for name in measurable):
            raise ValueError(f"{label}: {pattern!r} matches no layer; its layers are {_listing(shapes)}")
    return tuple(name for name in measurable if any(_matches(p, name) for p in chosen))


def _listing(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())


class ShapeCheck:
    """Remembers each selected layer's shape apart from the batch axis; ValueError when it changes.

    lead: 1, or 2 with a model axis. `check` returns the batch size and checks that every layer
    of both sides carries it.
    """

    def __init__(self, lead: int):
        self.lead = lead
        self.features: dict[tuple[str, str], tuple[int, ...]] = {}
        self.first: dict[tuple[str, str], int] = {}

    def _split(self, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        return shape[self.lead - 1], shape[: self.lead - 1] + shape[self.lead :]

    def check(self, index: int, sides: Sequence[tuple[str, Mapping[str, tuple[int, ...]]]]) -> int:
        """sides: (label, name -> shape) per model; returns the batch size of batch `index`."""
        sizes = []
        for label, shapes in sides:
            for name, shape in shapes.items():
                shape = tuple(shape)
                if len(shape) < self.lead:
                    raise ValueError(
                        f"batch {index}: {label} layer {name!r} has shape {shape}, expected "
                        f"{'(models, batch, ...)' if self.lead == 2 else '(batch, ...)'}"
                    )
                n, rest = self._split(shape)
                key = (label, name)
                if key not in self.features:
                    self.features[key], self.first[key] = rest, index
                elif self.features[key] != rest:
                    raise ValueError(
                        f"{label} layer {name!r} changes shape between batches: "
                        f"{self._show(self.features[key])} in batch {self.first[key]}, {shape} in batch "
                        f"{index} (* = batch axis)"
                    )
                sizes.append((n, label, name, shape))
        n, label, name, shape = sizes[0]
        for other in sizes[1:]:
            if other[0] != n:
                raise ValueError(
                    f"batch {index}: {label} layer {name!r} has {n} examples (shape {shape}) but "
                    f"{other[1]} layer {other[2]!r} has {other[0]} (shape {other[3]}); both models need "
                    "the same examples"
                )
        return n

    def _show(self, rest: tuple[int, ...]) -> str:
        """A stored shape with '*' for its batch axis, e.g. '(*, 36)'."""
        dims = [str(d) for d in rest[: self.lead - 1]] + ["*"] + [str(d) for d in rest[self.lead - 1 :]]
        return f"({', '.join(dims)})"


def shape_of(a) -> tuple[int, ...]:
    return tuple(int(s) for s in np.shape(a))
