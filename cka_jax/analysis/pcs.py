"""First principal components (paper Fig. 3, D.5): inside the block structure one direction
dominates each layer, the layers share it, and removing it removes the block from CKA.

Report section (`section`, entry `ANALYSIS`): pcs.npz, pcs.png.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from cka_jax import MinibatchCKA, first_pc_cosine_similarity, first_pc_variance_fraction, remove_first_pc
from cka_jax.analysis.blocks import blocks_in_structure, layers_inside, mean_heatmap_block, undefined_block_note
from cka_jax.analysis.entry import Analysis
from cka_jax.analysis.notes import caption, heatmap_note, joined, status_why, with_note
from cka_jax.analysis.outputs import Section, Table, write_npz
from cka_jax.analysis.plots import add_note, heatmap, new_figure, shared_colorbar, short_name
from cka_jax.analysis.representations import collect
from cka_jax.analysis.undefined import LayerStatus, left_out, mean_of_defined, number

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext


@dataclasses.dataclass(frozen=True)
class PrincipalComponents:
    """variance_fraction (M, L): first-PC share of each layer's variance; cosine (M, L, L): |cos|
    between first-PC scores of layer pairs; cka / cka_without_pc (M, L, L): CKA on the same
    examples before and after removing each layer's first PC."""

    variance_fraction: np.ndarray
    cosine: np.ndarray
    cka: np.ndarray
    cka_without_pc: np.ndarray
    layer_names: tuple[str, ...]


def _full_batch_cka(layers: list[jax.Array]) -> jax.Array:
    """Unbiased CKA between all layers (n, ...) computed on the n examples as one minibatch."""
    return MinibatchCKA.create(len(layers)).update(layers).result()


@jax.jit
def _one_model(layers: list[jax.Array]):
    fractions = jax.numpy.stack([first_pc_variance_fraction(x) for x in layers])
    removed = [remove_first_pc(x) for x in layers]
    return fractions, first_pc_cosine_similarity(layers), _full_batch_cka(layers), _full_batch_cka(removed)


def principal_components(reps: dict[str, np.ndarray]) -> PrincipalComponents:
    """PC statistics of representations name -> (M, n, ...) (the same n examples for all layers).
    Entries of a non-finite or constant layer (no first PC) are NaN (undefined)."""
    names = tuple(reps)
    per_model = [
        _one_model([np.asarray(reps[name][m]) for name in names]) for m in range(next(iter(reps.values())).shape[0])
    ]
    fraction, cosine, cka, without = (np.stack([np.asarray(out[i], np.float64) for out in per_model]) for i in range(4))
    bad = ~LayerStatus.of(reps).defined  # (M, L)
    pair_bad = bad[:, :, None] | bad[:, None, :]
    fraction[bad] = np.nan
    for a in (cosine, cka, without):
        a[pair_bad] = np.nan
    return PrincipalComponents(fraction, cosine, cka, without, names)


def plot_principal_components(pcs: PrincipalComponents, title: str, note: str = ""):
    """Variance fraction per layer (seeds, and the mean over the seeds whose every layer is
    defined), seed-averaged first-PC cosine, CKA before and after removing the first PC (over
    the seeds whose whole heatmap is defined); `note` under the figure. Returns the figure."""
    names = pcs.layer_names
    fig = new_figure((17, 4.4))
    grid = fig.add_gridspec(1, 4, width_ratios=[1.3, 1, 1, 1])
    ax = fig.add_subplot(grid[0])
    x = np.arange(len(names))
    for m, row in enumerate(pcs.variance_fraction):
        ax.plot(x, row, color="tab:blue", alpha=0.3, lw=1, label="seeds" if m == 0 else None)
    ax.plot(x, mean_of_defined(pcs.variance_fraction)[0], color="tab:blue", lw=2.5, marker="o", label="mean")
    ax.set_xticks(x, [short_name(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("variance explained by first PC")
    ax.legend(fontsize=8)
    heatmaps = tuple(mean_of_defined(a)[0] for a in (pcs.cosine, pcs.cka, pcs.cka_without_pc))
    titles = ("|cos| of first PCs (mean)", "CKA (mean)", "CKA without first PC (mean)")
    axes = [fig.add_subplot(grid[i + 1]) for i in range(3)]
    for ax, matrix, t in zip(axes, heatmaps, titles, strict=True):
        heatmap(ax, matrix, names, t, cbar=False, max_labels=20)
    fig.suptitle(title)
    fig.tight_layout()
    shared_colorbar(fig, axes, 0.0, 1.0, "magma")
    add_note(fig, note)
    return fig


def summary(pcs: PrincipalComponents, inside_layers: Sequence[bool]) -> dict[str, float]:
    """Mean first-PC variance fraction inside vs outside a block structure (`inside_layers`: (L,)
    mask), over the seeds whose every layer is defined; NaN where undefined or without such layers."""
    inside = np.asarray(inside_layers, bool)
    mean = mean_of_defined(pcs.variance_fraction)[0]
    return {
        "inside": float(mean[inside].mean()) if inside.any() else float("nan"),
        "outside": float(mean[~inside].mean()) if (~inside).any() else float("nan"),
    }


def section(ctx: AnalysisContext) -> Section:
    """Fig. 3 / D.5: first-PC variance fraction, first-PC cosine similarity, CKA without the first PC."""
    p = ctx.main
    block, block_layers = mean_heatmap_block(ctx, p)
    reps = collect(
        p, ctx.test.in_memory_images()[: ctx.options.max_examples], ctx.test, "blocks", progress=ctx.progress
    )
    status = LayerStatus.of(reps)
    pcs = principal_components(reps)
    write_npz(
        ctx.path("pcs.npz"),
        variance_fraction=pcs.variance_fraction,
        cosine=pcs.cosine,
        cka=pcs.cka,
        cka_without_first_pc=pcs.cka_without_pc,
        layer_names=np.array(pcs.layer_names),
    )
    mean, defined = mean_of_defined(pcs.variance_fraction)
    reason = left_out(defined, status_why(status, "no first principal component"))
    note = joined(reason, undefined_block_note(block))
    fig = plot_principal_components(pcs, f"{p.name}: first principal component of block outputs", heatmap_note(note))
    inside = layers_inside(pcs.layer_names, blocks_in_structure(block_layers, block))
    split = summary(pcs, inside) if block.defined else {"inside": np.nan, "outside": np.nan}
    split_reason = "block structure undefined" if not block.defined else "no such layer, or every seed undefined"
    rows = [[short_name(n), number(v, 3, reason)] for n, v in zip(pcs.layer_names, mean, strict=True)]
    text = (
        f"On the first {len(next(iter(reps.values()))[0])} test examples: the fraction of each block output's "
        "variance along its first principal component, the |cosine| between first-PC scores of layer pairs "
        "(example space, so layers of different widths compare), and CKA before and after removing each "
        "layer's first PC. In the paper, layers inside the block structure have a dominant first PC that "
        "they share, and removing it removes the block. Mean variance fraction inside the detected block "
        f"structure: {number(split['inside'], 3, split_reason)}; outside: "
        f"{number(split['outside'], 3, split_reason)}. A non-finite or constant layer has no first PC: "
        "its values are undefined."
    )
    table = Table(["layer", "first-PC variance fraction (mean over seeds)"], rows, caption(reason))
    return Section(
        "pcs", "Principal components", with_note(text, note), [ctx.save_figure(fig, "pcs")], [table], ["pcs.npz"]
    )


ANALYSIS = Analysis("pcs", section, description="first principal component (Fig. 3, D.5)")
