"""Learning dynamics (Raghu et al. 2017): each layer at kept training checkpoints against the same
layer of the final network of the same seed; networks converge bottom-up."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from cka_jax.analysis.cca_measures import same_layer
from cka_jax.analysis.plots import add_note, short_name
from cka_jax.analysis.undefined import mean_of_defined


def similarity_to_final(measure: str, reps: Mapping[str, np.ndarray], final: Mapping[str, np.ndarray]) -> np.ndarray:
    """(M, L) similarity of each model's layers (name -> (M, n, ...)) with the final network's."""
    return same_layer(measure, reps, final)


def plot_dynamics(values: Mapping[str, np.ndarray], fractions: Sequence[float], layer_names: Sequence[str],
                  title: str, note: str = ""):
    """One panel per measure: similarity to the final network per layer (mean over the seeds whose
    every layer is defined), one line per checkpoint (training fraction); `note` under the
    figure. values: measure -> (S, M, L)."""
    fig, axes = plt.subplots(1, len(values), figsize=(6.5 * len(values), 4), squeeze=False)
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(fractions)))
    x = np.arange(len(layer_names))
    for ax, (measure, v) in zip(axes[0], values.items()):
        for color, fraction, row in zip(colors, fractions, v):
            ax.plot(x, mean_of_defined(row)[0], marker="o", color=color, label=f"{fraction:.0%} of training")
        ax.set_xticks(x, [short_name(n) for n in layer_names], rotation=90, fontsize=8)
        ax.set(ylim=(0, 1.02), ylabel=f"{measure} with the final network", title=measure)
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    add_note(fig, note)
    return fig
