"""Per-example and per-class disagreement between populations (paper Fig. 7, F.1-F.4).

Per-example accuracy is the fraction of a population's models that classify an example
correctly. Two populations are compared against a baseline of two disjoint halves of one
population: systematic differences show as a wider scatter than the baseline's. Per-class
accuracies are compared with Welch's t-test over models, optionally with the
Benjamini-Hochberg false-discovery-rate correction.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
from scipy import stats


def correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(M, N) bool: model m classifies example n correctly. logits (M, N, C), labels (N,)."""
    return np.argmax(logits, -1) == np.asarray(labels)[None]


def per_example_accuracy(correct_: np.ndarray) -> np.ndarray:
    """(N,) fraction of models correct on each example, from (M, N) correctness."""
    return np.asarray(correct_, np.float64).mean(0)


def disjoint_halves(num_models: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of range(num_models) (the odd model out is left out)."""
    if num_models < 2:
        raise ValueError(f"splitting a population into halves needs at least 2 models, got {num_models}")
    order = np.random.default_rng(seed).permutation(num_models)
    half = num_models // 2
    return np.sort(order[:half]), np.sort(order[half:2 * half])


def per_class_accuracy(correct_: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(M, C) accuracy of each model on each class (NaN for a class without test examples)."""
    labels = np.asarray(labels)
    out = np.full((correct_.shape[0], num_classes), np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            out[:, c] = correct_[:, mask].mean(1)
    return out


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
        r = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else np.nan
        ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel=xl, ylabel=yl, aspect="equal",
               title=f"per-example accuracy (r = {r:.2f})")
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
