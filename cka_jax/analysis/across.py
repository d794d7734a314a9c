"""CKA across seeds (paper Fig. 6) and across architectures (Fig. E.1), with the library's
population mode: one accumulator holds every model pair (Ma, Mb, La, Lb)."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import matplotlib.pyplot as plt
import numpy as np

from cka_jax.analysis.plots import add_note, heatmap, heatmap_grid, shared_colorbar, short_name
from cka_jax.analysis.undefined import mean_of_defined
from cka_jax.analysis.representations import Progress, apply_fn, batch_indices, no_progress
from cka_jax.analysis.inputs import Population, TestSet
from cka_jax.minibatch import MinibatchCKA
from cka_jax.models import CaptureSpec, representation_names


def cross_cka(population_a: Population, population_b: Population | None, test: TestSet,
              capture: CaptureSpec = "blocks", batch_size: int = 256, passes: int = 1, seed: int = 0,
              progress: Progress = no_progress) -> np.ndarray:
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
        acc = MinibatchCKA.create(len(names_a), len(names_b), num_models_a=population_a.size,
                                  num_models_b=population_b.size)
        forward_b = apply_fn(population_b, capture)

    @jax.jit
    def step(acc, variables_a, variables_b, images, mean, std):
        reps_a = list(forward_a(variables_a, images, mean, std)[1].values())
        if forward_b is None:
            return acc.update(reps_a)
        return acc.update(reps_a, list(forward_b(variables_b, images, mean, std)[1].values()))

    variables_b = None if population_b is None else population_b.variables
    for idx in progress(batch_indices(len(test.labels), batch_size, passes, seed), desc="cross-model CKA",
                        leave=False):
        acc = step(acc, population_a.variables, variables_b, test.images[idx], test.mean, test.std)
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
    fig = heatmap_grid([mean, pairs[0, 1]], [f"mean over {count} seed pairs", "seed 0 (rows) vs seed 1 (columns)"],
                       layer_names, suptitle=title, ncols=2, panel=4.2)
    add_note(fig, note)
    return fig


def plot_same_layer(pairs: np.ndarray, layer_names: Sequence[str], title: str, note: str = ""):
    """CKA of each layer with the same layer of another seed (mean and range over the seed pairs
    whose every layer is defined); `note` under the figure."""
    same = same_layer_across_seeds(pairs)
    mean, defined = mean_of_defined(same)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layer_names)), 3.8))
    x = np.arange(len(layer_names))
    if defined.any():
        ax.fill_between(x, same[defined].min(0), same[defined].max(0), color="tab:purple", alpha=0.2,
                        label="range over pairs")
    ax.plot(x, mean, color="tab:purple", lw=2, marker="o", label="mean over seed pairs")
    ax.set_xticks(x, [short_name(n) for n in layer_names], rotation=90, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("CKA with the same layer, other seed")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    add_note(fig, note)
    return fig


def plot_architectures(heatmaps: Sequence[np.ndarray], names_a: Sequence[str], names_b: Sequence[Sequence[str]],
                       label_a: str, labels_b: Sequence[str], note: str = ""):
    """Seed-pair-averaged CKA between the layers of population A (rows) and each B (columns);
    `note` under the figure."""
    fig, axes = plt.subplots(1, len(heatmaps), figsize=(4.6 * len(heatmaps) + 0.8, 4.6), squeeze=False)
    for ax, h, nb, lb in zip(axes[0], heatmaps, names_b, labels_b):
        heatmap(ax, h, names_a, f"{label_a} (rows) vs {lb} (columns)", cbar=False, col_names=nb)
    fig.tight_layout()
    shared_colorbar(fig, axes, 0.0, 1.0, "magma")
    add_note(fig, note)
    return fig
