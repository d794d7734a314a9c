"""Convergent learning (Li et al. 2016) across two seeds: unit matching and sparse prediction.

Units are a layer's channels, spatially averaged, on the same test examples. Matched-correlation
curves sort the correlations of the matched pairs (one-to-one bipartite matching, and
semi-matching of each unit to its best partner); a layer whose curve stays high has units
that recur one for one across seeds (a local code). Sparse prediction fits each unit of seed
b from all units of seed a with an L1 penalty: a loss that stays low under strong penalties
means few units suffice (local code), one that rises needs many (distributed code).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from cka_jax.analysis.plots import add_note, short_name
from cka_jax.analysis.undefined import measurable
from cka_jax.matching import MATCHING_METHODS, match_units, sparse_prediction_loss

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
    return {m: np.sort(match_units(x, y, m).correlations)[::-1] for m in MATCHING_METHODS}


def mean_matched(correlations: np.ndarray) -> float:
    """Mean matched correlation; NaN (undefined) when nothing could be matched."""
    return float(np.mean(correlations)) if len(correlations) else float("nan")


def matching_curves(reps_a: Mapping[str, np.ndarray], reps_b: Mapping[str, np.ndarray]
                    ) -> dict[str, dict[str, np.ndarray]]:
    """layer -> method -> sorted matched correlations, for layers (n, units) of two models."""
    return {name: matched_correlations(reps_a[name], reps_b[name]) for name in reps_a}


def padded(curves: Mapping[str, Mapping[str, np.ndarray]], method: str) -> np.ndarray:
    """(L, max units) matched correlations of `method`, NaN-padded (for .npz files)."""
    rows = [c[method] for c in curves.values()]
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), np.nan)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def sparse_losses(reps_a: Mapping[str, np.ndarray], reps_b: Mapping[str, np.ndarray],
                  penalties: Sequence[float] = DEFAULT_L1_PENALTIES, seed: int = 0) -> np.ndarray:
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
    fig, axes = plt.subplots(1, len(MATCHING_METHODS), figsize=(6 * len(MATCHING_METHODS), 4), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(curves)))
    for ax, method in zip(axes[0], MATCHING_METHODS):
        for color, (name, c) in zip(colors, curves.items()):
            r = c[method]
            ax.plot(np.linspace(0, 1, len(r)), r, color=color, label=short_name(name))
        ax.set(xlabel="matched unit rank (fraction of units)", ylabel="correlation", ylim=(-0.05, 1.02),
               title=f"{method} matching")
    axes[0, -1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    add_note(fig, note)
    return fig


def plot_sparse(losses: np.ndarray, penalties: Sequence[float], layer_names: Sequence[str], title: str,
                note: str = ""):
    """Held-out prediction loss vs L1 penalty, one line per layer coloured by depth (none for an
    undefined layer); `note` under the figure."""
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(layer_names)))
    for color, name, row in zip(colors, layer_names, losses):
        ax.plot(penalties, row, marker="o", color=color, label=short_name(name))
    ax.set(xscale="log", xlabel="L1 penalty", ylabel="held-out loss (standardised units)", title=title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    add_note(fig, note)
    return fig
