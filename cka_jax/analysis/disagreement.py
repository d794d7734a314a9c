"""Per-example and per-class disagreement between populations (paper Fig. 7, F.1-F.4).

Per-example accuracy is the fraction of a group of models that classify an example correctly.
Two populations are compared against a baseline of two disjoint groups of one population, all
groups of equal size: systematic differences show as a wider scatter (a lower correlation) than
the baseline's. Per-class accuracies are compared with Welch's t-test over models, optionally
with the Benjamini-Hochberg false-discovery-rate correction.

Report section (`section`, entry `ANALYSIS`): disagreement.json, and per compared population
disagreement__<name>.npz and .png.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from scipy import stats

from cka_jax.analysis.entry import Analysis, all_populations, check_models
from cka_jax.analysis.outputs import Section, Table, write_json, write_npz
from cka_jax.analysis.plots import subplots
from cka_jax.analysis.undefined import is_defined, number

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext
    from cka_jax.analysis.inputs import TrainedPopulation


def per_example_accuracy(correct_: np.ndarray) -> np.ndarray:
    """(N,) fraction of models correct on each example, from (M, N) correctness."""
    return np.asarray(correct_, np.float64).mean(0)


def disjoint_groups(num_models: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random groups of `size` models each from range(num_models), sorted."""
    if not 1 <= size <= num_models // 2:
        raise ValueError(
            f"two disjoint groups of {size} models need 1 <= size <= {num_models // 2} "
            f"(half of the {num_models} models)"
        )
    order = np.random.default_rng(seed).permutation(num_models)
    return np.sort(order[:size]), np.sort(order[size : 2 * size])


def per_example_panels(
    correct_a: np.ndarray, correct_b: np.ndarray, seed: int = 0
) -> tuple[int, list[tuple[np.ndarray, np.ndarray, str, str]]]:
    """Per-example accuracy of population A vs B, then of two disjoint groups of A and of B (the
    baselines), every group of k = min(Ma, Mb) // 2 models so that all panels average as many
    models: (k, [(x (N,), y (N,), x label, y label)]) with labels 'A1', 'B1', 'A2', ..."""
    k = min(len(correct_a), len(correct_b)) // 2
    a1, a2 = disjoint_groups(len(correct_a), k, seed)
    b1, b2 = disjoint_groups(len(correct_b), k, seed + 1)
    pe = per_example_accuracy
    return k, [
        (pe(correct_a[a1]), pe(correct_b[b1]), "A1", "B1"),
        (pe(correct_a[a1]), pe(correct_a[a2]), "A1", "A2"),
        (pe(correct_b[b1]), pe(correct_b[b2]), "B1", "B2"),
    ]


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


def per_class_tests(
    accuracy_a: np.ndarray, accuracy_b: np.ndarray, alpha: float = 0.05, fdr: bool = False
) -> ClassTests:
    """Welch's t-test of per-class accuracies (Ma, C) vs (Mb, C) over models, class by class."""
    if accuracy_a.shape[1:] != accuracy_b.shape[1:]:
        raise ValueError(
            f"per-class accuracies must have the same classes, got {accuracy_a.shape} and {accuracy_b.shape}"
        )
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
        dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return OverallTest(
        a.mean(), np.sqrt(va), b.mean(), np.sqrt(vb), float(result.statistic), float(dof), float(result.pvalue)
    )


def plot_disagreement(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, str, str]], tests: ClassTests, class_names: Sequence[str], title: str
):
    """Scatter panels of per-example accuracy (x, y, x label, y label), then the per-class accuracy
    difference with significant classes highlighted. Returns the figure."""
    fig, axes = subplots(1, len(pairs) + 1, figsize=(4.2 * (len(pairs) + 1) + 1, 4.2))
    rng = np.random.default_rng(0)

    def jitter(v: np.ndarray) -> np.ndarray:
        return v + rng.uniform(-0.01, 0.01, v.shape)

    for ax, (x, y, xl, yl) in zip(axes, pairs, strict=False):  # the last axis shows the classes
        ax.scatter(jitter(x), jitter(y), s=6, alpha=0.35, color="tab:blue", edgecolor="none")
        ax.plot([0, 1], [0, 1], color="0.5", lw=0.8)
        ax.set(
            xlim=(-0.03, 1.03),
            ylim=(-0.03, 1.03),
            xlabel=xl,
            ylabel=yl,
            aspect="equal",
            title=f"per-example accuracy (r = {number(correlation(x, y), 2, 'a side is constant')})",
        )
    ax = axes[-1]
    order = np.argsort(tests.difference)
    colors = np.where(tests.significant[order], "tab:red", "0.6")
    ax.bar(np.arange(len(order)), tests.difference[order], color=colors)
    ax.axhline(0, color="k", lw=0.8)
    if len(order) <= 20:
        ax.set_xticks(np.arange(len(order)), [class_names[i] for i in order], rotation=90, fontsize=8)
    ax.set(
        xlabel="class (sorted)",
        ylabel="accuracy difference (A − B)",
        title=f"{int(tests.significant.sum())} of {len(order)} classes differ (red)",
    )
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _correlation_text(value: float) -> str:
    return number(value, 3, "a group's per-example accuracy is constant")


_UNTESTED_REASON = "no test examples, or accuracy constant over the models of both populations: the t-test is undefined"


def _compare(ctx: AnalysisContext, b: TrainedPopulation, classes: Sequence[str]) -> tuple[str, Table, dict]:
    """The main population against `b`: writes disagreement__<b>.npz and its figure; returns the
    figure's name, the table of differing classes and the disagreement.json record."""
    o, a, labels, num_classes = ctx.options, ctx.main, ctx.test.labels, ctx.test.num_classes
    correct_a, correct_b = ctx.correct(a), ctx.correct(b)
    k, panels = per_example_panels(correct_a, correct_b, o.seed)
    names = {"A": a.name, "B": b.name}

    def label(group: str) -> str:
        return f"{names[group[0]]} group {group[1]} ({k} models)"

    pairs = [(x, y, label(gx), label(gy)) for x, y, gx, gy in panels]
    correlations = {f"{gx} vs {gy}": correlation(x, y) for x, y, gx, gy in panels}
    acc_a = per_class_accuracy(correct_a, labels, num_classes)
    acc_b = per_class_accuracy(correct_b, labels, num_classes)
    tests = per_class_tests(acc_a, acc_b, o.alpha, o.fdr)
    overall = overall_test(correct_a.mean(1), correct_b.mean(1))
    write_npz(
        ctx.path(f"disagreement__{b.name}.npz"),
        per_example_a=per_example_accuracy(correct_a),
        per_example_b=per_example_accuracy(correct_b),
        class_accuracy_a=acc_a,
        class_accuracy_b=acc_b,
        difference=tests.difference,
        t=tests.t,
        p_value=tests.p_value,
        p_adjusted=tests.p_adjusted,
        significant=tests.significant,
    )
    fig = plot_disagreement(pairs, tests, classes, f"{a.name} (A) vs {b.name} (B)")
    figure = ctx.save_figure(fig, f"disagreement__{b.name}")
    differing = [int(c) for c in np.flatnonzero(tests.significant)]
    untested = [int(c) for c in np.flatnonzero(~np.isfinite(tests.p_value))]
    empty = [c for c in range(num_classes) if not np.any(labels == c)]
    record = {
        "population_b": b.name,
        "classes_differing": differing,
        "class_names_differing": [classes[c] for c in differing],
        "num_classes_differing": len(differing),
        "alpha": o.alpha,
        "fdr": o.fdr,
        "classes_untested": untested,
        "classes_untested_reason": _UNTESTED_REASON,
        "classes_without_test_examples": empty,
        "overall": overall._asdict(),
        "models_per_group": k,
        "per_example_correlation": correlations,
        "per_example_correlation_undefined_reason": {
            key: "a group's per-example accuracy is constant" for key, r in correlations.items() if not is_defined(r)
        },
    }
    rows = [
        [classes[c], number(tests.difference[c], 4, sign=True), f"{tests.p_value[c]:.3g}", f"{tests.p_adjusted[c]:.3g}"]
        for c in sorted(differing, key=lambda c: -tests.difference[c])
    ]
    correction = "Benjamini-Hochberg adjusted " if o.fdr else ""
    t_text = (
        f"t({overall.dof:.1f}) = {overall.t:.2f}, p = {overall.p_value:.3g}"
        if is_defined(overall.t)
        else "t-test undefined (each population's accuracy is the same for all its models)"
    )
    untested_text = (
        f"; {len(untested)} classes untested (t-test undefined: no test examples or constant accuracy)"
        if untested
        else ""
    )
    table = Table(
        ["class", "accuracy A − B", "p", "adjusted p"],
        rows,
        f"{a.name} vs {b.name}: {len(differing)} of {len(classes)} classes differ "
        f"({correction}Welch p < {o.alpha}){untested_text}; overall accuracy "
        f"{overall.mean_a:.4f} ± {number(overall.sem_a, 4, 'one model')} vs {overall.mean_b:.4f} "
        f"± {number(overall.sem_b, 4, 'one model')} (± SEM), {t_text}; per-example correlation "
        + ", ".join(f"{key}: {_correlation_text(r)}" for key, r in correlations.items()),
    )
    return figure, table, record


def section(ctx: AnalysisContext) -> Section:
    """Fig. 7 / F.1-F.4: per-example accuracy scatter and per-class Welch tests."""
    classes = ctx.class_names()
    compared = [_compare(ctx, b, classes) for b in ctx.populations[1:]]
    write_json(ctx.path("disagreement.json"), [record for _, _, record in compared])
    text = (
        "Per-example accuracy = the fraction of a group of models that get an example right. The first "
        "panel compares a group of each population (A1, B1); the next ones compare two disjoint groups of the "
        "same population, the baseline. Every group holds half the smaller population's models, so the "
        "scatters are comparable: systematic differences between architectures show as more scatter (a "
        "lower A1 vs B1 correlation, per_example_correlation in disagreement.json) than the baselines "
        "(jitter added to show overlapping points). Per-class accuracies are compared over all models with "
        "Welch's t-test (--fdr adds the Benjamini-Hochberg correction); a class whose test is undefined "
        "(no test examples, or the same accuracy for every model of both) is never counted as differing."
    )
    empty = [c for c in range(ctx.test.num_classes) if not np.any(ctx.test.labels == c)]
    if empty:
        text += (
            f"\n\nClasses without test examples (their accuracy is undefined): {', '.join(classes[c] for c in empty)}."
        )
    return Section(
        "disagreement",
        "Per-example and per-class disagreement",
        text,
        [figure for figure, _, _ in compared],
        [table for _, table, _ in compared],
        ["disagreement.json"] + [f"disagreement__{b.name}.npz" for b in ctx.populations[1:]],
    )


def check_predictions(ctx: AnalysisContext) -> None:
    """Two models per population (Welch's t-test), and every population's predictions read and
    checked (cached for the analysis)."""
    check_models(all_populations, "per-class disagreement", use_max_models=False)(ctx)
    for p in ctx.populations:
        ctx.correct(p)


ANALYSIS = Analysis(
    "disagreement",
    section,
    needs_compare=True,
    needs_images=False,
    description="per-example and per-class disagreement (Fig. 7, F.1-F.4)",
    check=check_predictions,
)
