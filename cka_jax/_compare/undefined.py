"""Warnings for undefined CKA entries: which layer, which batch, which model, and why.

NaN or inf activations make a layer's sums NaN from that minibatch on (the engine notes when);
a layer constant on every minibatch has zero self-similarity and NaN (0/0) CKA. Both stay NaN in
the heatmap: never masked, never replaced by a plausible number.
"""

from __future__ import annotations

import warnings

import numpy as np


def dead_layers(heat: np.ndarray, side: int, population: bool, all_pairs: bool) -> np.ndarray:
    """(models, layers) of side 0 (a, rows) or 1 (b, columns): True where every entry is NaN.

    heat: (La, Lb), (M, La, Lb) or, with all_pairs, (Ma, Mb, La, Lb).
    """
    h = heat if population else heat[None]
    if all_pairs and side == 1:
        h = np.swapaxes(h, 0, 1)  # model b's axis first
    h = np.moveaxis(h, -2 if side == 0 else -1, 1)
    return np.all(np.isnan(h.reshape(h.shape[0], h.shape[1], -1)), axis=2)


def _models(models: list[int], population: bool) -> str:
    return f" (model {', '.join(map(str, models))})" if population else ""


def warn_undefined(nonfinite, heat: np.ndarray, labels, names, population: bool, all_pairs: bool) -> None:
    """RuntimeWarnings for layers with NaN/inf activations, then for layers constant everywhere.

    nonfinite: per side, (model, layer) -> (first, last) batches of the update that made its sums
    non-finite (`Engine.nonfinite`); labels: the sides' names ("model_a", ...); names: layer names.
    """
    for side in range(len(labels)):
        by_layer: dict[int, list[tuple[int, tuple[int, int]]]] = {}
        for (model, layer), batches in sorted(nonfinite[side].items()):
            by_layer.setdefault(layer, []).append((model, batches))
        for layer, found in by_layer.items():
            first, last = min(batches for _, batches in found)
            where = f"batch {first}" if first == last else f"batches {first}-{last}"
            warnings.warn(
                f"{labels[side]} layer {names[side][layer]!r}{_models([m for m, _ in found], population)} has NaN "
                f"or inf activations (first in {where}): its CKA entries are NaN",
                RuntimeWarning,
                stacklevel=4,
            )
        dead = dead_layers(heat, side, population, all_pairs)
        for layer in range(dead.shape[1]):
            models = [m for m in range(dead.shape[0]) if dead[m, layer] and (m, layer) not in nonfinite[side]]
            if models:
                warnings.warn(
                    f"{labels[side]} layer {names[side][layer]!r}{_models(models, population)} is constant on every "
                    "minibatch: its CKA is undefined (NaN)",
                    RuntimeWarning,
                    stacklevel=4,
                )
