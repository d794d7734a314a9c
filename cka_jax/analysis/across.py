"""CKA across seeds (paper Fig. 6) and across architectures (Fig. E.1), with the library's
population mode: one accumulator holds every model pair (Ma, Mb, La, Lb).

Report sections: `seeds_section` (entry `SEEDS`): cka_seeds.npz, cka_seeds.png,
cka_seeds_same_layer.png; `architectures_section` (entry `ARCHITECTURES`): cka_architectures.npz/.png.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from cka_jax import MinibatchCKA
from cka_jax.analysis.bootstrap import bootstrap_mean, format_interval
from cka_jax.analysis.entry import Analysis, check_models, main_population
from cka_jax.analysis.notes import caption, heatmap_note, line_note, model_pairs, pair_name, pair_why, with_note
from cka_jax.analysis.outputs import Section, Table, write_npz
from cka_jax.analysis.plots import add_note, heatmap, heatmap_grid, shared_colorbar, short_name, subplots
from cka_jax.analysis.representations import ProgressFactory, apply_fn, batch_indices, no_progress
from cka_jax.analysis.undefined import defined_rows, left_out, mean_of_defined
from cka_jax.models import CaptureSpec, representation_names

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext
    from cka_jax.analysis.inputs import TestSet, TrainedPopulation


def cross_cka(
    population_a: TrainedPopulation,
    population_b: TrainedPopulation | None,
    test: TestSet,
    capture: CaptureSpec = "blocks",
    batch_size: int = 256,
    passes: int = 1,
    seed: int = 0,
    progress: ProgressFactory = no_progress,
) -> np.ndarray:
    """Minibatch CKA between the layers of every model pair: (Ma, Mb, La, Lb).

    population_b=None pairs the models of population_a with each other (Ma = Mb, La = Lb).
    """
    names_a = representation_names(population_a.model, capture)
    forward_a = apply_fn(population_a, capture)
    if population_b is None:
        acc = MinibatchCKA.create(len(names_a), num_models_a=population_a.size)
        forward_b = None
    else:
        names_b = representation_names(population_b.model, capture)
        acc = MinibatchCKA.create(
            len(names_a), len(names_b), num_models_a=population_a.size, num_models_b=population_b.size
        )
        forward_b = apply_fn(population_b, capture)

    @jax.jit
    def step(acc, variables_a, variables_b, images, mean, std):
        reps_a = list(forward_a(variables_a, images, mean, std)[1].values())
        if forward_b is None:
            return acc.update(reps_a)
        return acc.update(reps_a, list(forward_b(variables_b, images, mean, std)[1].values()))

    variables_b = None if population_b is None else population_b.variables
    for idx in progress(batch_indices(len(test.labels), batch_size, passes, seed), desc="cross-model CKA", leave=False):
        acc = step(acc, population_a.variables, variables_b, test.in_memory_images()[idx], test.mean, test.std)
    return np.asarray(acc.result())


def same_layer_across_seeds(pairs: np.ndarray) -> np.ndarray:
    """(M, M, L, L) model-pair heatmaps -> (M(M-1)/2, L): each layer's CKA with the same layer of
    another seed, once per unordered pair."""
    i, j = np.triu_indices(pairs.shape[0], 1)
    return np.diagonal(pairs[i, j], axis1=1, axis2=2)


def plot_seeds(pairs: np.ndarray, layer_names: Sequence[str], title: str, note: str = ""):
    """Cross-seed CKA heatmaps (M, M, L, L): the mean over the pairs of different seeds whose whole
    heatmap is defined, and the pair (seed 0, seed 1); `note` under the figure."""
    i, j = np.triu_indices(pairs.shape[0], 1)
    mean, defined = mean_of_defined(pairs[i, j])
    count = f"{len(defined)}" if defined.all() else f"{int(defined.sum())} of {len(defined)} (defined)"
    fig = heatmap_grid(
        [mean, pairs[0, 1]],
        [f"mean over {count} seed pairs", "seed 0 (rows) vs seed 1 (columns)"],
        layer_names,
        suptitle=title,
        ncols=2,
        panel=4.2,
    )
    add_note(fig, note)
    return fig


def plot_same_layer(pairs: np.ndarray, layer_names: Sequence[str], title: str, note: str = ""):
    """CKA of each layer with the same layer of another seed (mean and range over the seed pairs
    whose every layer is defined); `note` under the figure."""
    same = same_layer_across_seeds(pairs)
    mean, defined = mean_of_defined(same)
    fig, ax = subplots(figsize=(max(6, 0.35 * len(layer_names)), 3.8))
    x = np.arange(len(layer_names))
    if defined.any():
        ax.fill_between(
            x, same[defined].min(0), same[defined].max(0), color="tab:purple", alpha=0.2, label="range over pairs"
        )
    ax.plot(x, mean, color="tab:purple", lw=2, marker="o", label="mean over seed pairs")
    ax.set_xticks(x, [short_name(n) for n in layer_names], rotation=90, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("CKA with the same layer, other seed")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    add_note(fig, note)
    return fig


def plot_architectures(
    heatmaps: Sequence[np.ndarray],
    names_a: Sequence[str],
    names_b: Sequence[Sequence[str]],
    label_a: str,
    labels_b: Sequence[str],
    note: str = "",
):
    """Seed-pair-averaged CKA between the layers of population A (rows) and each B (columns);
    `note` under the figure."""
    fig, axes = subplots(1, len(heatmaps), figsize=(4.6 * len(heatmaps) + 0.8, 4.6), squeeze=False)
    for ax, h, nb, lb in zip(axes[0], heatmaps, names_b, labels_b, strict=True):
        heatmap(ax, h, names_a, f"{label_a} (rows) vs {lb} (columns)", cbar=False, col_names=nb)
    fig.tight_layout()
    shared_colorbar(fig, axes, 0.0, 1.0, "magma")
    add_note(fig, note)
    return fig


def seeds_section(ctx: AnalysisContext) -> Section:
    """Fig. 6: CKA between layers of different seeds of the same architecture."""
    p, o = ctx.main, ctx.options
    sub = p.subset(slice(0, o.max_models))
    pairs = cross_cka(sub, None, ctx.test, "blocks", o.batch_size, o.passes, o.seed, ctx.progress)
    names = representation_names(p.model, "blocks")
    write_npz(ctx.path("cka_seeds.npz"), cka=pairs, layer_names=np.array(names))
    index = model_pairs(sub.size)
    same = same_layer_across_seeds(pairs)
    note = ""
    if not np.isfinite(pairs).all():
        status = ctx.status(p)  # only when needed: it runs the within-model CKA
        note = left_out(
            defined_rows(np.stack([pairs[i, j] for i, j in index])),
            pair_why(status, status, "the CKA estimate is not finite", index),
            "seed pair",
            pair_name(index),
        )
    figures = [
        ctx.save_figure(plot_seeds(pairs, names, f"{p.name}: CKA across seeds", heatmap_note(note)), "cka_seeds"),
        ctx.save_figure(
            plot_same_layer(pairs, names, f"{p.name}: same layer, different seeds", line_note(note)),
            "cka_seeds_same_layer",
        ),
    ]
    mean, low, high = bootstrap_mean(same, o.num_bootstrap, o.level, o.seed)
    rows = [
        [short_name(n), format_interval(m, lo, hi, 3, note)]
        for n, m, lo, hi in zip(names, mean, low, high, strict=True)
    ]
    text = (
        f"Population-mode minibatch CKA between the block outputs of every pair of the first {sub.size} "
        "seeds. In the paper, layers outside a block structure match the same layer of other seeds closely, "
        "while block-structure representations differ across seeds."
    )
    table = Table(
        ["layer", f"CKA with the same layer of another seed, mean [{o.level:.0%} CI over pairs]"], rows, caption(note)
    )
    return Section("seeds", "CKA across seeds", with_note(text, note), figures, [table], ["cka_seeds.npz"])


def architectures_section(ctx: AnalysisContext) -> Section:
    """Fig. E.1: CKA between the layers of different architectures (seed pairs averaged)."""
    a, o = ctx.main, ctx.options
    heatmaps, names_b, labels_b, arrays, notes = [], [], [], {}, []
    sub_a = a.subset(slice(0, o.max_models))
    for b in ctx.populations[1:]:
        sub_b = b.subset(slice(0, o.max_models))
        pairs = cross_cka(sub_a, sub_b, ctx.test, "blocks", o.batch_size, o.passes, o.seed, ctx.progress)
        mean, defined = mean_of_defined(pairs.reshape((-1,) + pairs.shape[2:]))
        heatmaps.append(mean)
        if not defined.all():
            index = [(i, j) for i in range(sub_a.size) for j in range(sub_b.size)]
            why = pair_why(
                ctx.status(a),
                ctx.status(b),
                "the CKA estimate is not finite",
                index,
                f"{a.name} seed",
                f"{b.name} seed",
            )
            name = pair_name(index, f"{a.name} seed", f"{b.name} seed")
            notes.append(f"{a.name} vs {b.name}: " + left_out(defined, why, "model pair", name))
        names_b.append(representation_names(b.model, "blocks"))
        labels_b.append(b.name)
        arrays[f"cka__{b.name}"] = pairs
        arrays[f"layer_names__{b.name}"] = np.array(names_b[-1])
    names_a = representation_names(a.model, "blocks")
    write_npz(ctx.path("cka_architectures.npz"), layer_names=np.array(names_a), **arrays)
    note = "; ".join(notes)
    fig = plot_architectures(heatmaps, names_a, names_b, a.name, labels_b, heatmap_note(note))
    text = (
        "Population-mode minibatch CKA between the block outputs of every model of the main population "
        f"(rows) and every model of each compared one (columns), first {o.max_models} seeds each, averaged "
        "over the model pairs whose heatmap is wholly defined. cka__<name> in the .npz holds all pairs "
        "(Ma, Mb, La, Lb). In the paper, layers at the same relative depth match when neither network has a "
        "block structure."
    )
    return Section(
        "architectures",
        "CKA across architectures",
        with_note(text, note),
        [ctx.save_figure(fig, "cka_architectures")],
        [],
        ["cka_architectures.npz"],
    )


SEEDS = Analysis(
    "seeds",
    seeds_section,
    description="CKA across seeds (Fig. 6)",
    check=check_models(main_population, "cross-seed CKA"),
)
ARCHITECTURES = Analysis(
    "architectures", architectures_section, needs_compare=True, description="CKA across architectures (Fig. E.1)"
)
