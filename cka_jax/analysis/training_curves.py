"""How well a population trained: its curves from metrics.jsonl, diverged and under-trained seeds.

The report opens with these, so that its similarity figures are read knowing whether every seed
learned. Rows are read through `cka_jax.workdir.metrics_log` (a torn last line is dropped; non-finite
numbers are stored as null).

Diverged: a seed with a null (non-finite) train loss or accuracy in any epoch, or a row that
training marked `"diverged": true` (its loss exploded, or its state became non-finite).
Under-trained (among the others), with chance = 1 / number of classes: a seed whose final
accuracy closes less than half of the population median's gap above chance,
acc − chance < (median − chance) / 2, or whose final train accuracy is below 1.5 × chance (it
barely fits its training data). The accuracy is the final test accuracy; for random-label
populations (memorising, where test accuracy is chance by design) and runs without test
accuracy, the final train accuracy.

Report section (`section`, entry `ANALYSIS`): training.json, training_curves.png.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from cka_jax.analysis.entry import Analysis
from cka_jax.analysis.outputs import Section, Table, write_json
from cka_jax.analysis.plots import subplots
from cka_jax.analysis.undefined import mean_of_defined, model_list, number
from cka_jax.workdir import METRICS as METRICS_FILE
from cka_jax.workdir import Workdir, metrics_log

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext

METRICS = ("train_loss", "train_accuracy", "test_accuracy")
UNDER_TRAINED_RULE = (
    "under-trained: final accuracy less than halfway from chance to the population median "
    "(test accuracy; train accuracy for random labels), or final train accuracy below 1.5 × "
    "chance"
)


@dataclasses.dataclass(frozen=True)
class TrainingCurves:
    """Per-epoch metrics of M models over E epochs: epochs (E,); train_loss, train_accuracy,
    test_accuracy (M, E), NaN where not logged (test accuracy is evaluated every
    train.eval_every_epochs) or not finite; diverged_at (M,) the first epoch with a non-finite
    train metric or marked diverged, -1 if none; chance = 1 / number of classes."""

    epochs: np.ndarray
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray
    diverged_at: np.ndarray
    chance: float
    random_labels: bool = False

    @property
    def diverged(self) -> np.ndarray:
        return self.diverged_at >= 0

    def final(self, metric: str) -> np.ndarray:
        """(M,) last finite value of `metric` per model (NaN for a diverged model or none logged)."""
        values = getattr(self, metric)
        out = np.full(len(values), np.nan)
        for m, row in enumerate(values):
            finite = np.flatnonzero(np.isfinite(row))
            if len(finite) and not self.diverged[m]:
                out[m] = row[finite[-1]]
        return out

    def under_trained(self) -> np.ndarray:
        """(M,) bool: the seeds under-trained by the module's rule (never a diverged one)."""
        metric = (
            "train_accuracy" if self.random_labels or not np.isfinite(self.test_accuracy).any() else "test_accuracy"
        )
        accuracy, train = self.final(metric), self.final("train_accuracy")
        ok = np.isfinite(accuracy)
        if not ok.any():
            return np.zeros(len(accuracy), bool)
        median = np.median(accuracy[ok])
        with np.errstate(invalid="ignore"):
            behind = accuracy - self.chance < (median - self.chance) / 2
            unfit = train < 1.5 * self.chance
        return ~self.diverged & ok & (behind | unfit)


def _number(value: Any) -> float:
    """A metrics value as float; NaN for null and anything not a number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def _count(v: object) -> TypeGuard[int]:
    """Whether `v` is a non-negative integer (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def curves_from_rows(
    rows: Sequence[Mapping[str, Any]], num_models: int, num_classes: int, random_labels: bool = False
) -> TrainingCurves | None:
    """Curves of models 0..num_models-1 from metrics rows (the last row wins for a repeated
    (epoch, model)); None when no row names an epoch and a model. ValueError for a row whose
    epoch or model is not a non-negative integer."""
    latest: dict[tuple[int, int], Mapping[str, Any]] = {}
    for i, row in enumerate(rows):
        epoch, model = row.get("epoch"), row.get("model")
        if not (_count(epoch) and _count(model)):
            raise ValueError(f"row {i + 1} has epoch {epoch!r} and model {model!r}, not non-negative integers")
        if model < num_models:
            latest[(epoch, model)] = row
    if not latest:
        return None
    epochs = np.array(sorted({e for e, _ in latest}))
    column = {int(e): i for i, e in enumerate(epochs)}
    values = {k: np.full((num_models, len(epochs)), np.nan) for k in METRICS}
    diverged_at = np.full(num_models, -1)
    for (epoch, model), row in sorted(latest.items()):
        for k in METRICS:
            values[k][model, column[epoch]] = _number(row.get(k))
        non_finite = any(k in row and not math.isfinite(_number(row[k])) for k in ("train_loss", "train_accuracy"))
        if diverged_at[model] < 0 and (non_finite or row.get("diverged") is True):
            diverged_at[model] = epoch
    return TrainingCurves(
        epochs,
        values["train_loss"],
        values["train_accuracy"],
        values["test_accuracy"],
        diverged_at,
        1.0 / num_classes,
        random_labels,
    )


def read_curves(workdir: str, num_models: int, num_classes: int, random_labels: bool = False) -> TrainingCurves | None:
    """The curves of `workdir`'s metrics.jsonl; None when it has none (or no rows). ValueError
    when the file is damaged before its last line."""
    return curves_from_rows(metrics_log.read(Workdir(workdir).metrics), num_models, num_classes, random_labels)


def describe(curves: TrainingCurves) -> dict[str, Any]:
    """Summary numbers of `curves` (NaN where undefined) and the seeds marked."""
    test, train = curves.final("test_accuracy"), curves.final("train_accuracy")
    ok = ~curves.diverged

    def mean(v: np.ndarray) -> float:  # over the finite values of the seeds that did not diverge
        return float(mean_of_defined(v[ok])[0])

    return {
        "epochs": int(curves.epochs[-1]),
        "num_models": len(ok),
        "final_train_loss_mean": mean(curves.final("train_loss")),
        "final_train_accuracy_mean": mean(train),
        "final_test_accuracy_mean": mean(test),
        "final_test_accuracy": test,
        "diverged_seeds": np.flatnonzero(curves.diverged).tolist(),
        "diverged_at_epoch": curves.diverged_at[curves.diverged].tolist(),
        "under_trained_seeds": np.flatnonzero(curves.under_trained()).tolist(),
        "chance": curves.chance,
    }


def marked_seeds(curves: TrainingCurves) -> str:
    """'diverged: seed 2 (epoch 3); under-trained: seeds 0, 4' or 'no seed diverged or under-trained'."""
    parts = []
    if curves.diverged.any():
        bad = np.flatnonzero(curves.diverged)
        at = ", ".join(f"{m} (epoch {curves.diverged_at[m]})" for m in bad)
        parts.append(f"diverged: {'seed' if len(bad) == 1 else 'seeds'} {at}")
    under = np.flatnonzero(curves.under_trained())
    if len(under):
        parts.append(f"under-trained: {model_list(under.tolist())}")
    return "; ".join(parts) or "no seed diverged or under-trained"


def _seed_lines(ax, x: np.ndarray, values: np.ndarray, curves: TrainingCurves, under: np.ndarray) -> None:
    """One thin line per seed over its finite points: grey, orange and labelled with its index if
    under-trained, red and labelled if diverged (with a cross where it diverged)."""
    labelled = set()
    for m, row in enumerate(values):
        kind = "diverged seed" if curves.diverged[m] else "under-trained seed" if under[m] else "seed"
        color = {"seed": "0.6", "under-trained seed": "tab:orange", "diverged seed": "tab:red"}[kind]
        finite = np.flatnonzero(np.isfinite(row))
        ax.plot(
            x[finite],
            row[finite],
            color=color,
            lw=0.9 if kind == "seed" else 1.3,
            zorder=2 if kind == "seed" else 3,
            marker="." if len(finite) < 3 else None,
            label=None if kind in labelled else kind,
        )
        labelled.add(kind)
        if kind == "seed":
            continue
        if curves.diverged[m]:
            y = row[finite[-1]] if len(finite) else np.nanmax(values) if np.isfinite(values).any() else 1.0
            xy = (curves.diverged_at[m], y)
            ax.plot(*xy, "x", color="tab:red", ms=9, mew=2, zorder=4)
        elif len(finite):
            xy = (x[finite[-1]], row[finite[-1]])
        else:
            continue
        ax.annotate(f"seed {m}", xy, xytext=(4, 4), textcoords="offset points", fontsize=7, color=color)


def _mean_line(ax, x: np.ndarray, values: np.ndarray, curves: TrainingCurves, color: str, **kwargs) -> None:
    """Population mean over the seeds that did not diverge, at epochs where all of them logged it."""
    kept = values[~curves.diverged]
    if len(kept):
        mean = kept.mean(0)
        finite = np.isfinite(mean)
        ax.plot(x[finite], mean[finite], color=color, lw=2.6, marker="o", ms=3.5, **kwargs)


def plot_training(curves: Mapping[str, TrainingCurves], title: str):
    """One row per population: train loss and test accuracy per epoch, each seed thin (diverged
    red, under-trained orange) and the mean over the seeds that did not diverge thick. Returns
    the figure."""
    fig, axes = subplots(len(curves), 2, figsize=(12, 3.4 * len(curves) + 0.6), squeeze=False)
    for (name, c), (loss_ax, acc_ax) in zip(curves.items(), axes, strict=True):
        under = c.under_trained()
        x = c.epochs.astype(float)
        _seed_lines(loss_ax, x, c.train_loss, c, under)
        _mean_line(loss_ax, x, c.train_loss, c, "k", label="mean (seeds that did not diverge)")
        finite = c.train_loss[np.isfinite(c.train_loss)]
        if len(finite) and finite.min() > 0 and finite.max() > 10 * finite.min():  # spans a decade
            loss_ax.set_yscale("log")
        loss_ax.set(xlabel="epoch", ylabel="train loss", title=f"{name}: train loss")
        _seed_lines(acc_ax, x, c.test_accuracy, c, under)
        _mean_line(acc_ax, x, c.test_accuracy, c, "tab:blue", label="test accuracy, mean")
        _mean_line(acc_ax, x, c.train_accuracy, c, "tab:green", ls="--", label="train accuracy, mean")
        acc_ax.axhline(c.chance, color="0.3", ls=":", lw=1, label="chance")
        acc_ax.set(
            xlabel="epoch",
            ylabel="accuracy",
            ylim=(0, 1.02),
            title=f"{name}: accuracy (test: seeds and mean; train: mean, dashed)",
        )
        for ax in (loss_ax, acc_ax):
            ax.legend(fontsize=7, loc="best")
            if len(x) < 12:
                ax.set_xticks(x)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def section(ctx: AnalysisContext) -> Section:
    """How well each population trained: train loss and test accuracy per epoch from metrics.jsonl,
    diverged and under-trained seeds named."""
    curves, rows, records, notes = {}, [], [], []
    for p in ctx.populations:
        num_classes = ctx.test.num_classes
        try:
            c = read_curves(p.workdir, p.size, num_classes, bool(p.config.data.random_labels))
        except (OSError, ValueError) as error:
            notes.append(f"{p.name}: {METRICS_FILE} cannot be read ({error}); its curves are not shown")
            records.append({"population": p.name, "workdir": p.workdir, "error": str(error)})
            continue
        if c is None:
            notes.append(
                f"{p.name}: no training metrics (no {METRICS_FILE} rows in {os.path.abspath(p.workdir)}); "
                "its curves cannot be shown"
            )
            records.append({"population": p.name, "workdir": p.workdir, "error": f"no {METRICS_FILE} rows"})
            continue
        curves[p.name] = c
        summary = describe(c)
        records.append(
            {"population": p.name, "workdir": p.workdir, **summary, "under_trained_rule": UNDER_TRAINED_RULE}
        )
        notes.append(f"{p.name}: {marked_seeds(c)}")
        rows.append(_summary_row(p.name, p.size, summary))
    write_json(ctx.path("training.json"), records)
    figures = []
    if curves:
        fig = plot_training(curves, "Training curves (thin: seeds; thick: mean of the seeds that did not diverge)")
        figures.append(ctx.save_figure(fig, "training_curves"))
    text = (
        f"How well each population trained, from its {METRICS_FILE}, before its similarity figures: train loss "
        "and test accuracy per epoch, each seed a thin line (red: diverged, with a cross where it did; "
        "orange: under-trained) and the mean over the seeds that did not diverge a thick one. A seed diverged "
        "when its train loss or accuracy became non-finite; "
        + UNDER_TRAINED_RULE
        + ". The later sections analyse every seed, so read them knowing which these are.\n\n"
        + "\n\n".join(notes)
    )
    table = Table(
        [
            "population",
            "epochs",
            "seeds",
            "final train loss (mean)",
            "final test accuracy (mean)",
            "diverged",
            "under-trained",
        ],
        rows,
        "Means over the seeds that did not diverge",
    )
    return Section("training", "Training curves", text, figures, [table] if rows else [], ["training.json"])


def _summary_row(name: str, size: int, summary: Mapping[str, Any]) -> list[str]:
    """A population's row of the training table, from `describe`."""
    test = summary["final_test_accuracy"]
    ok = np.isfinite(test)
    spread = f" (seeds {test[ok].min():.3f} to {test[ok].max():.3f})" if ok.sum() > 1 else ""
    undefined = ""
    if len(summary["diverged_seeds"]) == size:
        undefined = "every seed diverged"
    elif not ok.any():
        undefined = "no seed reached a finite final value"

    def seeds(key: str) -> str:
        return model_list(summary[key]) if summary[key] else "none"

    return [
        name,
        str(summary["epochs"]),
        str(size),
        number(summary["final_train_loss_mean"], 4, undefined),
        number(summary["final_test_accuracy_mean"], 3, undefined or "not evaluated") + spread,
        seeds("diverged_seeds"),
        seeds("under_trained_seeds"),
    ]


ANALYSIS = Analysis(
    "training",
    section,
    needs_images=False,
    always=True,
    description="training curves from metrics.jsonl: diverged and under-trained seeds (always runs)",
)
