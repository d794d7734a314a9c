"""Convergent learning (Li et al. 2016) across two seeds: unit matching and sparse prediction.

Units are a layer's channels, spatially averaged, on the same test examples. Matched-correlation
curves sort the correlations of the matched pairs (one-to-one bipartite matching, and
semi-matching of each unit to its best partner); a layer whose curve stays high has units
that recur one for one across seeds (a local code). Sparse prediction fits each unit of seed
b from all units of seed a with an L1 penalty: a loss that stays low under strong penalties
means few units suffice (local code), one that rises needs many (distributed code).

Report sections: `matching_section` (entry `MATCHING`): matching.npz, matching.png;
`sparse_section` (entry `SPARSE`): sparse.npz, sparse.png.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

import jax
import numpy as np

from cka_jax import match_units, sparse_prediction_loss
from cka_jax._matching import MATCHING_METHODS
from cka_jax.analysis.entry import Analysis, check_models, main_population
from cka_jax.analysis.notes import line_note, with_note
from cka_jax.analysis.outputs import Section, Table, write_npz
from cka_jax.analysis.plots import add_note, colormap, short_name, subplots
from cka_jax.analysis.undefined import LayerStatus, measurable, number

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext

DEFAULT_L1_PENALTIES = (0.003, 0.01, 0.03, 0.1, 0.3)


def _correlatable(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether units x and y (n, ...) of two models can be correlated: each side all finite and
    not all constant (see `undefined.measurable`)."""
    return bool(measurable(np.asarray(x)[None])[0] and measurable(np.asarray(y)[None])[0])


def matched_correlations(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per matching method, the matched pairs' correlations sorted in descending order; empty
    (undefined) when either side is non-finite or constant."""
    if not _correlatable(x, y):
        return {m: np.zeros(0) for m in MATCHING_METHODS}
    return {
        m: np.sort(match_units(cast(jax.Array, x), cast(jax.Array, y), m).correlations)[::-1] for m in MATCHING_METHODS
    }


def mean_matched(correlations: np.ndarray) -> float:
    """Mean matched correlation; NaN (undefined) when nothing could be matched."""
    return float(np.mean(correlations)) if len(correlations) else float("nan")


def matching_curves(
    reps_a: Mapping[str, np.ndarray], reps_b: Mapping[str, np.ndarray]
) -> dict[str, dict[str, np.ndarray]]:
    """layer -> method -> sorted matched correlations, for layers (n, units) of two models."""
    return {name: matched_correlations(reps_a[name], reps_b[name]) for name in reps_a}


def padded(curves: Mapping[str, Mapping[str, np.ndarray]], method: str) -> np.ndarray:
    """(L, max units) matched correlations of `method`, NaN-padded (for .npz files)."""
    rows = [c[method] for c in curves.values()]
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def sparse_losses(
    reps_a: Mapping[str, np.ndarray],
    reps_b: Mapping[str, np.ndarray],
    penalties: Sequence[float] = DEFAULT_L1_PENALTIES,
    seed: int = 0,
) -> np.ndarray:
    """(L, P) held-out loss of predicting each layer of b from the same layer of a, per L1 penalty;
    NaN (undefined) for a layer with a non-finite or constant side."""

    def one(x, y):
        if not _correlatable(x, y):
            return np.full(len(penalties), np.nan)
        return sparse_prediction_loss(x, y, penalties, seed=seed)

    return np.stack([one(reps_a[n], reps_b[n]) for n in reps_a])


def plot_matching(curves: Mapping[str, Mapping[str, np.ndarray]], title: str, note: str = ""):
    """One panel per matching method: sorted matched correlation vs unit rank (fraction of units),
    one line per layer coloured by depth (none for an undefined layer); `note` under the figure."""
    fig, axes = subplots(1, len(MATCHING_METHODS), figsize=(6 * len(MATCHING_METHODS), 4), squeeze=False)
    colors = colormap("viridis")(np.linspace(0, 0.9, len(curves)))
    for ax, method in zip(axes[0], MATCHING_METHODS, strict=True):
        for color, (name, c) in zip(colors, curves.items(), strict=True):
            r = c[method]
            ax.plot(np.linspace(0, 1, len(r)), r, color=color, label=short_name(name))
        ax.set(
            xlabel="matched unit rank (fraction of units)",
            ylabel="correlation",
            ylim=(-0.05, 1.02),
            title=f"{method} matching",
        )
    axes[0, -1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    add_note(fig, note)
    return fig


def plot_sparse(losses: np.ndarray, penalties: Sequence[float], layer_names: Sequence[str], title: str, note: str = ""):
    """Held-out prediction loss vs L1 penalty, one line per layer coloured by depth (none for an
    undefined layer); `note` under the figure."""
    fig, ax = subplots(figsize=(7, 4))
    colors = colormap("viridis")(np.linspace(0, 0.9, len(layer_names)))
    for color, name, row in zip(colors, layer_names, losses, strict=True):
        ax.plot(penalties, row, marker="o", color=color, label=short_name(name))
    ax.set(xscale="log", xlabel="L1 penalty", ylabel="held-out loss (standardised units)", title=title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    add_note(fig, note)
    return fig


def _two_seeds(ctx: AnalysisContext) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], LayerStatus]:
    """Pooled block outputs of seeds 0 and 1 of the main population: name -> (n, C) each, and
    their status (models 0 and 1)."""
    reps = ctx.pooled_blocks(ctx.main)
    status = LayerStatus.of({n: r[:2] for n, r in reps.items()})
    return {n: r[0] for n, r in reps.items()}, {n: r[1] for n, r in reps.items()}, status


def _layer_reasons(status: LayerStatus) -> list[str]:
    """Per layer: why seeds 0 and 1 cannot be compared there ('' when they can)."""
    return [status.why([0, 1], layers=[i]) for i in range(len(status.layer_names))]


_NOTHING_MATCHED = "no unit pair has a defined correlation"


def matching_section(ctx: AnalysisContext) -> Section:
    """Li et al. 2016: bipartite and semi-matching of units across two seeds, per layer."""
    a, b, status = _two_seeds(ctx)
    curves = matching_curves(a, b)
    write_npz(
        ctx.path("matching.npz"),
        layer_names=np.array(list(curves)),
        **{f"{m}_correlations": padded(curves, m) for m in MATCHING_METHODS},
    )
    reasons = _layer_reasons(status)
    undefined = [
        f"{short_name(n)} ({r or _NOTHING_MATCHED})"
        for (n, c), r in zip(curves.items(), reasons, strict=True)
        if not len(c[MATCHING_METHODS[0]])
    ]
    note = f"undefined layers (nothing to match): {', '.join(undefined)}" if undefined else ""
    fig = plot_matching(curves, f"{ctx.main.name}: matched unit correlations, seed 0 vs seed 1", line_note(note))
    rows = [
        [short_name(n)] + [number(mean_matched(c[m]), 3, r or _NOTHING_MATCHED) for m in MATCHING_METHODS]
        for (n, c), r in zip(curves.items(), reasons, strict=True)
    ]
    text = (
        "Units (spatially averaged channels) of each block output of seed 0 matched to those of seed 1 by "
        "Pearson correlation over test examples: one-to-one (bipartite, Hungarian algorithm) and semi-matching "
        "(each unit to its best partner). Curves sort the matched correlations; high curves mean units recur "
        "one for one across seeds. A layer that is non-finite or constant in either seed is undefined."
    )
    table = Table(["layer"] + [f"mean {m} matched correlation" for m in MATCHING_METHODS], rows)
    return Section(
        "matching",
        "Unit matching across seeds",
        with_note(text, note),
        [ctx.save_figure(fig, "matching")],
        [table],
        ["matching.npz"],
    )


def sparse_section(ctx: AnalysisContext) -> Section:
    """Li et al. 2016: L1-penalised prediction of one seed's units from another's (local vs distributed)."""
    a, b, status = _two_seeds(ctx)
    penalties = DEFAULT_L1_PENALTIES
    losses = sparse_losses(a, b, penalties, ctx.options.seed)
    names = list(a)
    write_npz(ctx.path("sparse.npz"), loss=losses, l1_penalties=np.array(penalties), layer_names=np.array(names))
    reasons = [r or "every unit of seed 1 is constant" for r in _layer_reasons(status)]
    undefined = [
        f"{short_name(n)} ({r})" for n, row, r in zip(names, losses, reasons, strict=True) if not np.isfinite(row).all()
    ]
    note = f"undefined layers: {', '.join(undefined)}" if undefined else ""
    fig = plot_sparse(
        losses, penalties, names, f"{ctx.main.name}: sparse prediction of seed 1 from seed 0", line_note(note)
    )
    rows = [[short_name(n)] + [number(v, 3, r) for v in row] for n, row, r in zip(names, losses, reasons, strict=True)]
    text = (
        "Each standardised unit of seed 1 is predicted from all units of the same layer of seed 0 by Lasso "
        "regression; the loss is measured on a held-out quarter of the examples (1 = predicting the mean). A "
        "loss that stays low as the penalty grows means a few units suffice (local code); a loss that rises "
        "means the code is distributed. A layer that is non-finite or constant in either seed is undefined."
    )
    table = Table(["layer"] + [f"α = {alpha:g}" for alpha in penalties], rows, "Held-out loss per L1 penalty")
    return Section(
        "sparse",
        "Sparse prediction across seeds",
        with_note(text, note),
        [ctx.save_figure(fig, "sparse")],
        [table],
        ["sparse.npz"],
    )


MATCHING = Analysis(
    "matching",
    matching_section,
    description="cross-seed unit matching (Li et al. 2016)",
    check=check_models(main_population, "unit matching"),
)
SPARSE = Analysis(
    "sparse",
    sparse_section,
    description="sparse prediction of units across seeds (Li et al. 2016)",
    check=check_models(main_population, "sparse prediction"),
)
