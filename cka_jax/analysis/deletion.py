"""Block deletion (paper Fig. 5): test accuracy when one residual block's branch is removed (its
shortcut kept); inside the block structure this costs little, outside it costs a lot.

Report section (`section`, entry `ANALYSIS`): deletion.npz, deletion.png.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from cka_jax.analysis.blocks import blocks_in_structure, mean_heatmap_block, undefined_block_note
from cka_jax.analysis.bootstrap import bootstrap_mean, format_interval
from cka_jax.analysis.entry import Analysis, Inapplicable
from cka_jax.analysis.notes import caption, joined, line_note, with_note
from cka_jax.analysis.outputs import Section, Table, write_npz
from cka_jax.analysis.plots import add_note, finish_layer_axis, subplots
from cka_jax.analysis.representations import ProgressFactory, no_progress, test_logits
from cka_jax.analysis.undefined import defined_rows, left_out, mean_of_defined

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext
    from cka_jax.analysis.inputs import TestSet, TrainedPopulation


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 accuracy (M,) of logits (M, N, C) against labels (N,); NaN (undefined) for a model
    whose logits are not all finite (argmax would silently pick class 0)."""
    return np.where(defined_rows(logits), (np.argmax(logits, -1) == labels[None]).mean(-1), np.nan)


def deletion_accuracy(
    population: TrainedPopulation,
    test: TestSet,
    deletions: Sequence[tuple[str, ...]],
    progress: ProgressFactory = no_progress,
) -> np.ndarray:
    """Test accuracy (M, len(deletions)) with each tuple of blocks deleted (() keeps the network)."""
    columns = [
        accuracy(test_logits(population, test, tuple(skip)), test.labels)
        for skip in progress(list(deletions), desc="block deletion", leave=False)
    ]
    return np.stack(columns, axis=1)


def plot_deletion(
    full: np.ndarray,
    deleted: np.ndarray,
    block_names: Sequence[str],
    title: str,
    inside: Sequence[bool] = (),
    note: str = "",
):
    """Accuracy after deleting each block (seeds thin, mean over the defined seeds thick) against
    the full network's mean accuracy (dashed); blocks inside the block structure shaded; `note`
    under the figure. full (M,), deleted (M, B)."""
    fig, ax = subplots(figsize=(max(6, 0.35 * len(block_names)), 4))
    x = np.arange(len(block_names))
    for row in deleted:
        ax.plot(x, row, color="tab:red", alpha=0.25, lw=1)
    ax.plot(x, mean_of_defined(deleted)[0], color="tab:red", lw=2, marker="o", label="block deleted")
    full_mean = mean_of_defined(full)[0]
    if np.isfinite(full_mean):
        ax.axhline(full_mean, color="k", ls="--", lw=1, label="no deletion")
    finish_layer_axis(ax, block_names, inside, "test accuracy", title)
    fig.tight_layout()
    add_note(fig, note)
    return fig


def section(ctx: AnalysisContext) -> Section:
    """Fig. 5: test accuracy after deleting each residual block."""
    p, o = ctx.main, ctx.options
    names = p.model.block_names()
    acc = deletion_accuracy(p, ctx.test, [(), *[(b,) for b in names]], ctx.progress)
    full, deleted = acc[:, 0], acc[:, 1:]
    block, block_layers = mean_heatmap_block(ctx, p)
    inside_blocks = blocks_in_structure(block_layers, block)
    inside = [b in inside_blocks for b in names]
    write_npz(
        ctx.path("deletion.npz"),
        full_accuracy=full,
        accuracy=deleted,
        block_names=np.array(names),
        inside_block_structure=np.array(inside),
        block_structure_defined=block.defined,
    )
    note = left_out(
        defined_rows(acc), lambda m: "non-finite logits" + ("" if np.isfinite(full[m]) else " of the whole network")
    )
    notes = joined(note, undefined_block_note(block))
    fig = plot_deletion(full, deleted, names, f"{p.name}: accuracy with one block deleted", inside, line_note(notes))
    mean, low, high = bootstrap_mean(full[:, None] - deleted, o.num_bootstrap, o.level, o.seed)
    inside_text = (lambda flag: "yes" if flag else "no") if block.defined else (lambda flag: "undefined")
    rows = [
        [b, inside_text(flag), format_interval(m, lo, hi, 3, note)]
        for b, flag, m, lo, hi in zip(names, inside, mean, low, high, strict=True)
    ]
    fm, fl, fh = bootstrap_mean(full, o.num_bootstrap, o.level, o.seed)
    text = (
        f"Each residual block's branch is removed in turn (its shortcut kept) and the whole test set "
        f"re-scored. Full-network accuracy: {format_interval(fm, fl, fh, 3, note)} (mean [{o.level:.0%} CI "
        "over seeds]). Shaded: blocks inside the detected block structure, where the paper finds deletion "
        "costs little. A network with non-finite logits has an undefined accuracy."
    )
    table = Table(["deleted block", "inside block structure", "accuracy drop, mean [CI]"], rows, caption(note))
    return Section(
        "deletion",
        "Block deletion",
        with_note(text, notes),
        [ctx.save_figure(fig, "deletion")],
        [table],
        ["deletion.npz"],
    )


def check_residual(ctx: AnalysisContext) -> None:
    """Inapplicable unless the main population has residual connections (a branch to delete)."""
    if not ctx.main.config.model.residual:
        raise Inapplicable(f"block deletion needs residual connections; {ctx.main.workdir!r} was trained without")


ANALYSIS = Analysis("deletion", section, description="block deletion accuracy (Fig. 5)", check=check_residual)
