"""Per-example and per-class disagreement between populations (paper Fig. 7, F.1-F.4).

Per-example accuracy is the fraction of a group of models that classify an example correctly.
Two populations are compared against a baseline of two disjoint groups of one population, all
groups of equal size: systematic differences show as a wider scatter (a lower correlation) than
the baseline's. Per-class accuracies are compared with Welch's t-test over models, optionally
with the Benjamini-Hochberg false-discovery-rate correction.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

from cka_jax.analysis.undefined import number


def per_example_accuracy(correct_: np.ndarray) -> np.ndarray:
    """(N,) fraction of models correct on each example, from (M, N) correctness."""
    return np.asarray(correct_, np.float64).mean(0)


def disjoint_groups(num_models: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random groups of `size` models each from range(num_models), sorted."""
    if not 1 <= size <= num_models // 2:
        raise ValueError(f"two disjoint groups of {size} models need 1 <= size <= {num_models // 2} "
                         f"(half of the {num_models} models)")
    order = np.random.default_rng(seed).permutation(num_models)
    return np.sort(order[:size]), np.sort(order[size:2 * size])


def per_example_panels(correct_a: np.ndarray, correct_b: np.ndarray, seed: int = 0
                       ) -> tuple[int, list[tuple[np.ndarray, np.ndarray, str, str]]]:
    """Per-example accuracy of population A vs B, then of two disjoint groups of A and of B (the
    baselines), every group of k = min(Ma, Mb) // 2 models so that all panels average as many
    models: (k, [(x (N,), y (N,), x label, y label)]) with labels 'A1', 'B1', 'A2', ..."""
    k = min(len(correct_a), len(correct_b)) // 2
    a1, a2 = disjoint_groups(len(correct_a), k, seed)
    b1, b2 = disjoint_groups(len(correct_b), k, seed + 1)
    pe = per_example_accuracy
    return k, [(pe(correct_a[a1]), pe(correct_b[b1]), "A1", "B1"),
               (pe(correct_a[a1]), pe(correct_a[a2]), "A1", "A2"),
               (pe(correct_b[b1]), pe(correct_b[b2]), "B1", "B2")]


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of per-example accuracies (N,) and (N,); NaN if either is constant."""
    return float(np.corrcoef(x, y)[0, 1]) if np.std(x) > 0 and np.std(y) > 0 else float("nan")


def per_class_accuracy(correct_: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(M, C) accuracy of each model on each class (NaN for a class without test examples)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    hits = np.stack([np.bincount(labels, weights=c, minlength=num_classes) for c in np.asarray(correct_, np.float64)])
    with np.errstate(invalid="ignore"):
        return hits / counts


class ClassTests(NamedTuple):
    """Welch's t-test per class between populations A and B (arrays of shape (C,)).

    difference: mean accuracy of A minus B. p_value: raw two-sided p; p_adjusted: after the
    Benjamini-Hochberg correction when requested, else equal to p_value. significant:
    p_adjusted < alpha (never for classes whose test is undefined, e.g. both constant).
    """
    difference: np.ndarray
    t: np.ndarray
    p_value: np.ndarray
    p_adjusted: np.ndarray
    significant: np.ndarray


def per_class_tests(accuracy_a: np.ndarray, accuracy_b: np.ndarray, alpha: float = 0.05,
                    fdr: bool = False) -> ClassTests:
    """Welch's t-test of per-class accuracies (Ma, C) vs (Mb, C) over models, class by class."""
    if accuracy_a.shape[1:] != accuracy_b.shape[1:]:
        raise ValueError(f"per-class accuracies must have the same classes, got {accuracy_a.shape} and "
                         f"{accuracy_b.shape}")
    if min(len(accuracy_a), len(accuracy_b)) < 2:
        raise ValueError("Welch's t-test needs at least 2 models in each population")
    with warnings.catch_warnings():  # classes with (nearly) constant accuracy are expected; their p is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        t, p = stats.ttest_ind(accuracy_a, accuracy_b, axis=0, equal_var=False)
    t, p = np.asarray(t, np.float64), np.asarray(p, np.float64)
    adjusted = p.copy()
    defined = np.isfinite(p)
    if fdr and defined.any():
        adjusted[defined] = stats.false_discovery_control(p[defined], method="bh")
    difference = np.nanmean(accuracy_a, 0) - np.nanmean(accuracy_b, 0)
    return ClassTests(difference, t, p, adjusted, defined & (adjusted < alpha))


class OverallTest(NamedTuple):
    """Overall accuracy of A and B (mean ± standard error over models) and Welch's t-test."""
    mean_a: float
    sem_a: float
    mean_b: float
    sem_b: float
    t: float
    dof: float
    p_value: float


def overall_test(accuracy_a: np.ndarray, accuracy_b: np.ndarray) -> OverallTest:
    """Welch's t-test between per-model accuracies (Ma,) and (Mb,)."""
    a, b = np.asarray(accuracy_a, np.float64), np.asarray(accuracy_b, np.float64)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return OverallTest(a.mean(), np.sqrt(va), b.mean(), np.sqrt(vb), float(result.statistic), float(dof),
                       float(result.pvalue))


def plot_disagreement(pairs: Sequence[tuple[np.ndarray, np.ndarray, str, str]], tests: ClassTests,
                      class_names: Sequence[str], title: str):
    """Scatter panels of per-example accuracy (x, y, x label, y label), then the per-class accuracy
    difference with significant classes highlighted. Returns the figure."""
    fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(4.2 * (len(pairs) + 1) + 1, 4.2))
    rng = np.random.default_rng(0)
    for ax, (x, y, xl, yl) in zip(axes, pairs):
        jitter = lambda v: v + rng.uniform(-0.01, 0.01, v.shape)
        ax.scatter(jitter(x), jitter(y), s=6, alpha=0.35, color="tab:blue", edgecolor="none")
        ax.plot([0, 1], [0, 1], color="0.5", lw=0.8)
        ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel=xl, ylabel=yl, aspect="equal",
               title=f"per-example accuracy (r = {number(correlation(x, y), 2, 'a side is constant')})")
    ax = axes[-1]
    order = np.argsort(tests.difference)
    colors = np.where(tests.significant[order], "tab:red", "0.6")
    ax.bar(np.arange(len(order)), tests.difference[order], color=colors)
    ax.axhline(0, color="k", lw=0.8)
    if len(order) <= 20:
        ax.set_xticks(np.arange(len(order)), [class_names[i] for i in order], rotation=90, fontsize=8)
    ax.set(xlabel="class (sorted)", ylabel="accuracy difference (A − B)",
           title=f"{int(tests.significant.sum())} of {len(order)} classes differ (red)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
