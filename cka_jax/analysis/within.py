"""Within-model CKA heatmaps (paper Fig. 1, C.1, D.1): every layer pair of each model, computed
by `cka_jax.analysis.layer_heatmaps` (once per run, through `AnalysisContext.within`).

Report section (`section`, entry `ANALYSIS`): cka_within.npz (block outputs and stem),
cka_within_pre_and_post.npz, cka_within_all.npz, and a figure of each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cka_jax.analysis.entry import Analysis
from cka_jax.analysis.layer_heatmaps import LayerHeatmaps, within_cka
from cka_jax.analysis.notes import with_note
from cka_jax.analysis.outputs import Section, Table, write_npz
from cka_jax.analysis.plots import UNDEFINED_KEY, add_note, heatmap_grid
from cka_jax.analysis.undefined import number

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext

__all__ = ["ANALYSIS", "LayerHeatmaps", "plot_within", "section", "summary_rows", "within_cka"]


def plot_within(heatmaps: LayerHeatmaps, title: str, max_models: int = 7):
    """Seed-averaged heatmap followed by up to `max_models` per-model heatmaps; undefined cells
    hatched and explained under the figure. Returns the figure."""
    shown = heatmaps.cka[:max_models]
    defined = heatmaps.defined_models()
    mean_title = (
        f"mean of {heatmaps.cka.shape[0]} seeds"
        if defined.all()
        else f"mean of {int(defined.sum())} of {len(defined)} seeds (defined ones)"
    )
    titles = [mean_title] + [f"seed {m}" + ("" if defined[m] else " (undefined cells)") for m in range(len(shown))]
    fig = heatmap_grid([heatmaps.mean(), *shown], titles, heatmaps.layer_names, suptitle=title)
    add_note(fig, f"{UNDEFINED_KEY}: {heatmaps.mean_note()}" if not defined.all() else "")
    return fig


def summary_rows(heatmaps: LayerHeatmaps) -> list[list[str]]:
    """Per model: mean off-diagonal CKA and CKA of the first vs last layer, or 'undefined (why)'
    (report table rows)."""
    rows = []
    off = ~np.eye(heatmaps.cka.shape[1], dtype=bool)
    for m, h in enumerate(heatmaps.cka):
        reason = heatmaps.why(m)
        rows.append([f"seed {m}", number(h[off].mean(), 3, reason), number(h[0, -1], 3, reason)])
    return rows


def section(ctx: AnalysisContext) -> Section:
    """Fig. 1 / C.1 / D.1: CKA between all layers, block outputs and pre/post-residual layers."""
    heatmaps = ctx.within(ctx.main)
    figures, numbers = [], []
    for capture, stem, what in (
        ("blocks", "cka_within", "block outputs (post-residual) and stem"),
        ("pre_and_post", "cka_within_pre_and_post", "pre- and post-residual layers"),
        ("all", "cka_within_all", "all layers"),
    ):
        h = heatmaps.select(capture)
        write_npz(ctx.path(f"{stem}.npz"), **h.arrays())
        numbers.append(f"{stem}.npz")
        figures.append(ctx.save_figure(plot_within(h, f"{ctx.main.name}: CKA between {what}"), stem))
    blocks = heatmaps.select("blocks")
    table = Table(
        ["model", "mean CKA between block outputs", "CKA(stem, last block)"],
        summary_rows(blocks),
        "Per seed, over the block-output heatmap",
    )
    text = (
        f"Linear CKA (unbiased minibatch estimator, {ctx.options.passes} pass(es) over the test set in "
        f"minibatches of at most {ctx.options.batch_size}) between every pair of layers of each model. "
        "The first panel averages the seeds. A block structure shows as a large bright square of "
        "consecutive layers; pre/post-residual pairs give the checkerboard. "
        "cka_within.npz holds cka (M, L, L) over the stem and every block output, and layer_names (L,); "
        "layer_finite and layer_varying (M, L) say which layers had non-finite or constant activations, "
        "which make their CKA undefined (NaN, hatched in the figures)."
    )
    return Section("within", "Within-model CKA", with_note(text, heatmaps.mean_note()), figures, [table], numbers)


ANALYSIS = Analysis("within", section, description="within-model CKA heatmaps (Fig. 1, C.1, D.1)")
