"""Block structure (paper Fig. 2, D.2): the largest run of consecutive layers with high mutual CKA.

The detector works on a block-output heatmap (post-residual layers, which avoids the
checkerboard of pre/post-residual pairs): the block is the longest contiguous range of layers
in which every pair has CKA >= threshold. Its size in layers, and as a fraction of the
layers, is the number per model that turns width/depth/data-fraction sweeps into one table.

Report section (`section`, entry `ANALYSIS`): blocks.npz, blocks.json, blocks_grid.png.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.patches import Rectangle

from cka_jax.analysis.bootstrap import bootstrap_mean, format_interval
from cka_jax.analysis.entry import Analysis
from cka_jax.analysis.notes import heatmap_note, with_note
from cka_jax.analysis.outputs import Section, Table, write_json, write_npz
from cka_jax.analysis.plots import add_note, heatmap, shared_colorbar, subplots
from cka_jax.analysis.undefined import is_defined, left_out, mean_of_defined, number

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext
    from cka_jax.analysis.inputs import TrainedPopulation


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
    return tuple(n.rsplit("/", 1)[0] for n in layer_names[block.start : block.stop] if n.endswith("/post_residual"))


def plot_block_grid(
    heatmaps: Sequence[np.ndarray],
    layer_names: Sequence[Sequence[str]],
    blocks: Sequence[BlockStructure],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    positions: Sequence[tuple[int, int]],
    title: str,
    note: str = "",
):
    """Heatmaps at grid `positions` (row, col) with the detected block outlined; rows and columns
    labelled (e.g. data fraction × width); `note` under the figure. Returns the figure."""
    nrows, ncols = len(row_labels), len(col_labels)
    fig, axes = subplots(nrows, ncols, figsize=(3.2 * ncols + 0.8, 3.2 * nrows + 0.6), squeeze=False)
    used = set(positions)
    for (r, c), h, names, block in zip(positions, heatmaps, layer_names, blocks, strict=True):
        ax = axes[r, c]
        heatmap(ax, h, names, block.describe(len(names)), cbar=False, max_labels=12)
        if block.defined and block.size:
            ax.add_patch(
                Rectangle(
                    (block.start, block.start), block.size, block.size, fill=False, edgecolor="cyan", linewidth=1.5
                )
            )
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


def mean_heatmap_block(ctx: AnalysisContext, population: TrainedPopulation) -> tuple[BlockStructure, tuple[str, ...]]:
    """The block structure of `population`'s seed-averaged block-output heatmap, and the names of
    its block outputs (for the analyses that shade the layers inside it)."""
    h = ctx.within(population).select("blocks")
    o = ctx.options
    return detect_block(h.mean(), o.block_threshold, o.block_min_layers), h.layer_names


def undefined_block_note(block: BlockStructure) -> str:
    """What an undefined block structure means for the layers marked as inside it ('' if defined)."""
    if block.defined:
        return ""
    return (
        "the block structure is undefined (no seed's block-output heatmap is wholly defined: see Within-model "
        "CKA), so no layer is marked as inside or outside it"
    )


def layers_inside(layer_names: Sequence[str], blocks_inside: Sequence[str]) -> list[bool]:
    """Per layer: does it belong to a residual block inside the block structure."""
    return [any(n.startswith(b + "/") for b in blocks_inside) for n in layer_names]


def _grid_positions(populations: list[TrainedPopulation]) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Rows by training-data fraction (largest first), columns by architecture."""
    rows = sorted({p.config.data.fraction for p in populations}, reverse=True)
    cols: list[str] = []
    positions: list[tuple[int, int]] = []
    taken: set[tuple[int, str]] = set()
    for p in populations:
        row = rows.index(p.config.data.fraction)
        label = p.architecture if (row, p.architecture) not in taken else f"{p.architecture} ({p.name})"
        taken.add((row, label))
        if label not in cols:
            cols.append(label)
        positions.append((row, cols.index(label)))
    return [f"data fraction {f:g}" for f in rows], cols, positions


SENSITIVITY_THRESHOLDS = (0.7, 0.8, 0.85, 0.9, 0.95)  # block sizes are also reported at these


def _sizes_text(sizes: np.ndarray) -> str:
    """Block sizes per seed as table text, 'undefined' for NaN."""
    return " ".join(str(int(v)) if np.isfinite(v) else "undefined" for v in sizes)


def _population_blocks(ctx: AnalysisContext, p: TrainedPopulation, thresholds: Sequence[float]) -> dict:
    """Block sizes of `p` at every threshold, their means over the seeds whose heatmap is defined,
    the bootstrap interval at the chosen threshold and the block of the mean heatmap."""
    o = ctx.options
    h = ctx.within(p).select("blocks")
    num_layers = len(h.layer_names)
    sizes_at = {t: block_sizes(h.cka, t, o.block_min_layers) for t in thresholds}
    sizes = sizes_at[o.block_threshold]
    by_threshold = {t: float(mean_of_defined(s[:, 2])[0]) / num_layers for t, s in sizes_at.items()}
    mean, low, high = bootstrap_mean(sizes[:, 2] / num_layers, o.num_bootstrap, o.level, o.seed)
    return {
        "heatmaps": h,
        "sizes": sizes,
        "by_threshold": by_threshold,
        "interval": (mean, low, high),
        "note": left_out(np.isfinite(sizes[:, 2]), h.why),
        "mean_block": detect_block(h.mean(), o.block_threshold, o.block_min_layers),
    }


def _record(ctx: AnalysisContext, p: TrainedPopulation, r: dict) -> dict:
    """The blocks.json record of population `p` from its `_population_blocks`."""
    h, sizes, mean_block = r["heatmaps"], r["sizes"], r["mean_block"]
    mean, low, high = r["interval"]
    undefined = np.flatnonzero(~np.isfinite(sizes[:, 2])).tolist()
    return {
        "population": p.name,
        "workdir": p.workdir,
        "architecture": p.architecture,
        "data_fraction": p.config.data.fraction,
        "num_layers": len(h.layer_names),
        "block_per_model": sizes,
        "undefined_models": undefined,
        "undefined_reason": {str(m): h.why(m) for m in undefined},
        "block_fraction_mean": mean,
        "block_fraction_interval": [low, high],
        "level": ctx.options.level,
        "block_fraction_note": r["note"],
        "block_of_mean_heatmap": [mean_block.start, mean_block.stop] if mean_block.defined else None,
        "blocks_inside": blocks_in_structure(h.layer_names, mean_block),
        "block_fraction_by_threshold": {f"{t:g}": f for t, f in r["by_threshold"].items()},
    }


def _table_row(p: TrainedPopulation, r: dict) -> list[str]:
    """The population's row of the block-size table."""
    sizes, note = r["sizes"], r["note"]
    mean, low, high = r["interval"]
    interval = format_interval(mean, low, high, 2, note or "undefined heatmaps")
    return [
        p.name,
        p.architecture,
        f"{p.config.data.fraction:g}",
        _sizes_text(sizes[:, 2]),
        str(len(r["heatmaps"].layer_names)),
        interval + (f" ({note})" if note and is_defined(mean) else ""),
    ]


def section(ctx: AnalysisContext) -> Section:
    """Fig. 2 / D.2: the block structure's size per model, and a grid over all populations."""
    o = ctx.options
    results, notes = [], []
    thresholds = sorted({*SENSITIVITY_THRESHOLDS, o.block_threshold})
    for p in ctx.populations:
        r = _population_blocks(ctx, p, thresholds)
        results.append(r)
        if r["note"]:
            notes.append(f"{p.name}: {r['note']}")
    main = results[0]
    write_npz(
        ctx.path("blocks.npz"),
        block=main["sizes"],
        layer_names=np.array(main["heatmaps"].layer_names),
        threshold=o.block_threshold,
    )
    write_json(ctx.path("blocks.json"), [_record(ctx, p, r) for p, r in zip(ctx.populations, results, strict=True)])
    row_labels, col_labels, positions = _grid_positions(ctx.populations)
    fig = plot_block_grid(
        [r["heatmaps"].mean() for r in results],
        [r["heatmaps"].layer_names for r in results],
        [r["mean_block"] for r in results],
        row_labels,
        col_labels,
        positions,
        "Block structure (seed-averaged block-output CKA; detected block outlined)",
        heatmap_note("; ".join(notes)),
    )
    table = Table(
        [
            "population",
            "architecture",
            "data fraction",
            "block size per seed (layers)",
            "layers",
            f"block fraction, mean [{o.level:.0%} CI over seeds]",
        ],
        [_table_row(p, r) for p, r in zip(ctx.populations, results, strict=True)],
    )
    sensitivity_rows = [
        [p.name] + [number(r["by_threshold"][t], 2, "every seed undefined") for t in thresholds]
        for p, r in zip(ctx.populations, results, strict=True)
    ]
    sensitivity = Table(
        ["population"] + [f"CKA ≥ {t:g}" for t in thresholds],
        sensitivity_rows,
        "Mean block fraction over seeds as the threshold (--block_threshold) varies: how much the "
        "sizes above depend on it" + (f" ({'; '.join(notes)})" if notes else ""),
    )
    text = (
        f"The block structure is the longest run of consecutive block outputs whose pairwise CKA all reach "
        f"{o.block_threshold} (at least {o.block_min_layers} layers), found per seed on the block-output "
        "heatmap. A heatmap with any undefined cell has an undefined block (it could complete or break any "
        "block): its size is 'undefined', never 0. Pass sweeps (width, depth, data fraction) with --compare "
        "to fill the grid: rows are training-data fractions, columns architectures. Intervals are percentile "
        "bootstraps over seeds."
    )
    return Section(
        "blocks",
        "Block structure",
        with_note(text, "; ".join(notes)),
        [ctx.save_figure(fig, "blocks_grid")],
        [table, sensitivity],
        ["blocks.npz", "blocks.json"],
    )


ANALYSIS = Analysis("blocks", section, description="block structure detection and sweep grid (Fig. 2, D.2)")
