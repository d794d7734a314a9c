"""Block deletion (paper Fig. 5): test accuracy when one residual block's branch is removed (its
shortcut kept); inside the block structure this costs little, outside it costs a lot."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from cka_jax.analysis.plots import add_note, finish_layer_axis
from cka_jax.analysis.representations import Progress, no_progress, test_logits
from cka_jax.analysis.undefined import defined_rows, mean_of_defined
from cka_jax.analysis.inputs import Population, TestSet


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 accuracy (M,) of logits (M, N, C) against labels (N,); NaN (undefined) for a model
    whose logits are not all finite (argmax would silently pick class 0)."""
    return np.where(defined_rows(logits), (np.argmax(logits, -1) == labels[None]).mean(-1), np.nan)


def deletion_accuracy(population: Population, test: TestSet, deletions: Sequence[tuple[str, ...]],
                      progress: Progress = no_progress) -> np.ndarray:
    """Test accuracy (M, len(deletions)) with each tuple of blocks deleted (() keeps the network)."""
    columns = [accuracy(test_logits(population, test, tuple(skip)), test.labels)
               for skip in progress(list(deletions), desc="block deletion", leave=False)]
    return np.stack(columns, axis=1)


def plot_deletion(full: np.ndarray, deleted: np.ndarray, block_names: Sequence[str], title: str,
                  inside: Sequence[bool] = (), note: str = ""):
    """Accuracy after deleting each block (seeds thin, mean over the defined seeds thick) against
    the full network's mean accuracy (dashed); blocks inside the block structure shaded; `note`
    under the figure. full (M,), deleted (M, B)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(block_names)), 4))
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
