"""Block structure (paper Fig. 2, D.2): the largest run of consecutive layers with high mutual CKA.

The detector works on a block-output heatmap (post-residual layers, which avoids the
checkerboard of pre/post-residual pairs): the block is the longest contiguous range of layers
in which every pair has CKA >= threshold. Its size in layers, and as a fraction of the
layers, is the number per model that turns width/depth/data-fraction sweeps into one table.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from cka_jax.analysis.plots import add_note, heatmap, shared_colorbar


@dataclasses.dataclass(frozen=True)
class BlockStructure:
    """Layers [start, stop) form the block; size = stop - start (0 and start = stop = -1 if none).
    defined=False (UNDEFINED_BLOCK): the heatmap had undefined (NaN) cells, so whether and where
    a block lies is unknown; its size is then NaN, never 0."""
    start: int
    stop: int
    mean_cka: float
    defined: bool = True

    @property
    def size(self) -> int | float:
        return self.stop - self.start if self.defined else float("nan")

    def describe(self, num_layers: int) -> str:
        """'block: 3/8 layers', 'no block' or 'block: undefined'."""
        if not self.defined:
            return "block: undefined"
        return f"block: {self.size}/{num_layers} layers" if self.size else "no block"


NO_BLOCK = BlockStructure(-1, -1, float("nan"))
UNDEFINED_BLOCK = BlockStructure(-1, -1, float("nan"), defined=False)


def detect_block(cka: np.ndarray, threshold: float = 0.85, min_layers: int = 3) -> BlockStructure:
    """The longest range of consecutive layers of `cka` (L, L) whose pairwise CKA all reach
    `threshold` (ties: the higher mean CKA, then the earlier range); NO_BLOCK when no range
    of at least `min_layers` layers qualifies; UNDEFINED_BLOCK when any entry is NaN or infinite
    (an undefined cell could complete or break any block)."""
    cka = np.asarray(cka, np.float64)
    if cka.ndim != 2 or cka.shape[0] != cka.shape[1]:
        raise ValueError(f"cka must be a square (L, L) heatmap, got shape {cka.shape}")
    if min_layers < 2:
        raise ValueError(f"min_layers must be >= 2, got {min_layers}")
    if not np.isfinite(cka).all():
        return UNDEFINED_BLOCK
    high = np.minimum(cka, cka.T) >= threshold
    num_layers = cka.shape[0]
    best, best_key = NO_BLOCK, (0, -np.inf)
    for start in range(num_layers):
        stop = start + 1
        while stop < num_layers and high[stop, start:stop].all():
            stop += 1
        if stop - start < max(min_layers, best_key[0]):
            continue
        inside = cka[start:stop, start:stop]
        mean = float(inside[~np.eye(stop - start, dtype=bool)].mean())
        if (stop - start, mean) > best_key:
            best, best_key = BlockStructure(start, stop, mean), (stop - start, mean)
    return best


def block_sizes(heatmaps: np.ndarray, threshold: float = 0.85, min_layers: int = 3) -> np.ndarray:
    """Per model (M, L, L) -> (M, 3) float rows (start, stop, size): -1/-1/0 where no block,
    NaN/NaN/NaN where the model's heatmap is undefined (see `detect_block`)."""
    rows = []
    for h in heatmaps:
        b = detect_block(h, threshold, min_layers)
        rows.append((b.start, b.stop, b.size) if b.defined else (np.nan,) * 3)
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def blocks_in_structure(layer_names: Sequence[str], block: BlockStructure) -> tuple[str, ...]:
    """Residual block names ('stage3/block2') whose output layer lies inside `block` (none for an
    undefined block: check `block.defined` before reading this as 'no block')."""
    if not block.defined or block.size == 0:
        return ()
    return tuple(n.rsplit("/", 1)[0] for n in layer_names[block.start:block.stop] if n.endswith("/post_residual"))


def plot_block_grid(heatmaps: Sequence[np.ndarray], layer_names: Sequence[Sequence[str]],
                    blocks: Sequence[BlockStructure], row_labels: Sequence[str], col_labels: Sequence[str],
                    positions: Sequence[tuple[int, int]], title: str, note: str = ""):
    """Heatmaps at grid `positions` (row, col) with the detected block outlined; rows and columns
    labelled (e.g. data fraction × width); `note` under the figure. Returns the figure."""
    nrows, ncols = len(row_labels), len(col_labels)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 0.8, 3.2 * nrows + 0.6), squeeze=False)
    used = set(positions)
    for (r, c), h, names, block in zip(positions, heatmaps, layer_names, blocks):
        ax = axes[r, c]
        heatmap(ax, h, names, block.describe(len(names)), cbar=False, max_labels=12)
        if block.defined and block.size:
            ax.add_patch(plt.Rectangle((block.start, block.start), block.size, block.size, fill=False,
                                       edgecolor="cyan", linewidth=1.5))
    for r in range(nrows):
        for c in range(ncols):
            if (r, c) not in used:
                axes[r, c].axis("off")
        axes[r, 0].set_ylabel(row_labels[r], fontsize=10)
    for c in range(ncols):
        axes[0, c].set_title(f"{col_labels[c]}\n{axes[0, c].get_title()}", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    shared_colorbar(fig, axes, 0.0, 1.0, "magma")
    add_note(fig, note)
    return fig
