"""CKA heatmaps as in Kornblith et al. 2019 and Nguyen et al. 2021: magma on [0, 1], first layer
at the bottom left (origin lower), model a's layers up the y axis, model b's along x, a colorbar.

Undefined (NaN) cells are hatched grey so they never read as a value. matplotlib is imported
here only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ANNOTATE_UP_TO = 12  # layers per side up to which cell values are written by default
MAX_PANELS = 36  # heatmaps in one population figure


def _panels(result, index) -> list[tuple[np.ndarray, str]]:
    """(matrix (La, Lb), panel title) for each heatmap to draw."""
    heat = np.asarray(result.heatmap)
    if not result.population:
        if index is not None:
            raise ValueError("index selects a model of a population; this comparison has one heatmap")
        return [(heat, "")]
    if result.all_pairs:
        if index is None:
            pairs = [(i, j) for i in range(heat.shape[0]) for j in range(heat.shape[1])]
        elif isinstance(index, tuple) and len(index) == 2:
            pairs = [index]
        else:
            raise ValueError(f"all_pairs heatmaps are chosen by index=(model_a, model_b), got {index!r}")
        panels = [(heat[i, j], f"a{i} vs b{j}") for i, j in pairs]
    else:
        panels = [(heat[i], f"model {i}") for i in (range(heat.shape[0]) if index is None else [index])]
    if len(panels) > MAX_PANELS:
        raise ValueError(
            f"{len(panels)} heatmaps are too many for one figure (at most {MAX_PANELS}); pick one with index="
        )
    return panels


def _draw(ax, matrix, result, title: str, cmap, annotate: bool, max_labels: int):
    import matplotlib.pyplot as plt

    rows, cols = matrix.shape
    ax.add_patch(
        plt.Rectangle((-0.5, -0.5), cols, rows, facecolor="0.92", edgecolor="0.55", hatch="xx", linewidth=0, zorder=0)
    )
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        origin="lower",
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        aspect="equal" if rows == cols else "auto",
        zorder=1,
    )
    for axis, names, count, rotation in ((ax.xaxis, result.layers_b, cols, 90), (ax.yaxis, result.layers_a, rows, 0)):
        step = max(1, -(-count // max_labels))
        ticks = np.arange(0, count, step)
        axis.set_ticks(ticks)
        axis.set_ticklabels([names[i] for i in ticks], rotation=rotation, fontsize=7 if count > 20 else 8)
    ax.set_xlabel(f"{result.name_b} layer")
    ax.set_ylabel(f"{result.name_a} layer")
    if annotate:
        for (r, c), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(
                    c,
                    r,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if value < 0.6 else "black",
                    zorder=2,
                )
    ax.set_title(title, fontsize=10)
    return image


def plot_comparison(result, index=None, ax=None, title=None, cmap="magma", max_labels=40, annotate=None, alpha=None):
    """Draws `result` (a CKAComparison); returns the matplotlib Figure. alpha: marks with an open
    circle the entries whose permutation p-value exceeds it (not significant; needs p_values)."""
    import matplotlib
    import matplotlib.pyplot as plt

    if not isinstance(max_labels, int) or max_labels < 1:
        raise ValueError(f"max_labels must be a positive integer, got {max_labels!r}")
    panels = _panels(result, index)
    if alpha is not None:
        if result.p_values is None:
            raise ValueError("alpha marks entries by their p-values: compare with num_permutations > 0")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
        p_panels = _panels(dataclasses.replace(result, heatmap=result.p_values), index)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad=(0, 0, 0, 0))  # NaN: show the hatching below
    if annotate is None:
        annotate = max(len(result.layers_a), len(result.layers_b)) <= ANNOTATE_UP_TO
    heading = (
        title if title is not None else f"CKA: {result.name_a} vs {result.name_b} ({result.num_examples} examples)"
    )
    if ax is not None:
        if len(panels) != 1:
            raise ValueError(f"ax draws one heatmap; this population has {len(panels)}: pick one with index=")
        fig, axes = ax.figure, [ax]
    else:
        ncols = min(4, len(panels))
        nrows = -(-len(panels) // ncols)
        side = 4.2 if len(panels) == 1 else 3.4
        fig, grid = plt.subplots(
            nrows, ncols, figsize=(side * ncols + 1.2, side * nrows + 0.6), squeeze=False, layout="constrained"
        )
        axes = list(grid.flat)
        for extra in axes[len(panels) :]:
            extra.axis("off")
    image = None
    for axis, (matrix, label) in zip(axes, panels, strict=False):
        panel_title = heading if len(panels) == 1 else label
        image = _draw(axis, matrix, result, panel_title, colormap, annotate, max_labels)
        if alpha is not None:
            rows, cols = np.nonzero(p_panels[axes.index(axis)][0] > alpha)
            axis.scatter(cols, rows, s=30, facecolors="none", edgecolors="0.6", linewidths=1.0, zorder=3)
    if len(panels) > 1:
        fig.suptitle(heading)
    fig.colorbar(image, ax=axes[: len(panels)], shrink=0.8, label="CKA")
    return fig
