"""Shared figure pieces: new figures, readable layer labels and CKA-style heatmaps.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`, never pyplot), so
importing or drawing chooses no backend: analyze.py saves them headless, and a notebook shows
the figure a plot function returns (after `%matplotlib inline`). seaborn, which draws the
heatmaps, is imported on first use.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

_TAPS = {"post_residual": "post", "pre_residual": "pre", "conv1": "c1", "conv2": "c2"}


def new_figure(figsize: tuple[float, float]) -> Figure:
    """An empty figure owned by no backend (saved with `outputs.save_figure`, shown by IPython)."""
    return Figure(figsize=figsize)


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.4, 4.8), squeeze: bool = True):
    """(figure, axes) like `pyplot.subplots`, without pyplot: axes (nrows, ncols) unless squeezed."""
    fig = new_figure(figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def colormap(name: str):
    """The registered colormap `name` (e.g. 'viridis'): maps values in [0, 1] to RGBA."""
    return matplotlib.colormaps[name]


def short_name(name: str) -> str:
    """'stage2/block3/post_residual' -> 's2b3 post'; other names unchanged."""
    m = re.fullmatch(r"stage(\d+)/block(\d+)(?:/(\w+))?", name)
    if not m:
        return name
    stage, block, tap = m.groups()
    return f"s{stage}b{block}" + (f" {_TAPS.get(tap, tap)}" if tap else "")


UNDEFINED_FACE, UNDEFINED_EDGE, UNDEFINED_HATCH = "0.92", "0.55", "xx"
UNDEFINED_KEY = "hatched: undefined"


def add_note(fig, text: str, width: int = 160) -> None:
    """Writes `text` (e.g. what is undefined and why) under the figure, wrapped; nothing if empty."""
    if text:
        fig.text(0.01, -0.01, textwrap.fill(text, width), ha="left", va="top", fontsize=8, color="0.2")


def heatmap(
    ax,
    matrix: np.ndarray,
    names: Sequence[str] | None = None,
    title: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
    cbar: bool = True,
    max_labels: int = 40,
    col_names: Sequence[str] | None = None,
    cmap: str = "magma",
) -> None:
    """Draws `matrix` (La, Lb) with layer 0 at the bottom left, like the paper's figures; labels
    every k-th layer so at most `max_labels` show per axis."""
    import seaborn as sns  # slow to import (it loads pandas): only heatmaps need it

    rows, cols = matrix.shape
    col_names = names if col_names is None else col_names
    undefined = ~np.isfinite(matrix)
    sns.heatmap(
        np.where(undefined, np.nan, matrix),
        ax=ax,
        vmin=vmin,
        vmax=vmax,
        cmap=cmap,
        square=rows == cols,
        cbar=cbar,
        xticklabels=False,
        yticklabels=False,
        cbar_kws={"shrink": 0.7} if cbar else None,
    )
    if undefined.any():  # seaborn leaves NaN cells empty: hatch them so they never read as a value
        ax.add_patch(
            Rectangle(
                (0, 0),
                cols,
                rows,
                facecolor=UNDEFINED_FACE,
                edgecolor=UNDEFINED_EDGE,
                hatch=UNDEFINED_HATCH,
                linewidth=0,
                zorder=-1,
            )
        )
        ax.set_axisbelow(True)
    ax.invert_yaxis()
    for axis, labels, count, rotation in ((ax.xaxis, col_names, cols, 90), (ax.yaxis, names, rows, 0)):
        if labels is None:
            continue
        step = max(1, -(-count // max_labels))
        ticks = np.arange(0, count, step)
        axis.set_ticks(ticks + 0.5)
        axis.set_ticklabels([short_name(labels[i]) for i in ticks], rotation=rotation, fontsize=7 if count > 20 else 8)
    ax.set_title(title, fontsize=10)


def heatmap_grid(
    matrices: Sequence[np.ndarray],
    titles: Sequence[str],
    names: Sequence[str] | None,
    suptitle: str = "",
    ncols: int = 4,
    panel: float = 3.6,
    **kwargs,
) -> Figure:
    """A figure of heatmaps side by side (one shared colour scale); returns the figure."""
    n = len(matrices)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = subplots(nrows, ncols, figsize=(panel * ncols + 0.6, panel * nrows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            heatmap(ax, matrices[i], names, titles[i], cbar=False, **kwargs)
        else:
            ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    shared_colorbar(fig, axes, kwargs.get("vmin", 0.0), kwargs.get("vmax", 1.0), kwargs.get("cmap", "magma"))
    return fig


def shared_colorbar(fig, axes, vmin: float, vmax: float, cmap: str) -> None:
    """One colour bar for all heatmaps of `axes`, to their right."""
    mappable = ScalarMappable(norm=Normalize(vmin, vmax), cmap=cmap)
    fig.colorbar(mappable, ax=axes, shrink=0.6, pad=0.02)


def finish_layer_axis(
    ax, names: Sequence[str], inside: Sequence[bool], ylabel: str, title: str, fontsize: int = 8
) -> None:
    """Shades the layers inside the block structure, labels the layer axis, adds title and legend."""
    for i, flag in enumerate(inside):
        if flag:
            ax.axvspan(i - 0.5, i + 0.5, color="0.85", zorder=0)
    ax.set_xticks(np.arange(len(names)), [short_name(n) for n in names], rotation=90, fontsize=fontsize)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
