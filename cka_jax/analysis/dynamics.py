"""Learning dynamics (Raghu et al. 2017): each layer at kept training checkpoints against the same
layer of the final network of the same seed; networks converge bottom-up.

Report section (`section`, entry `ANALYSIS`): dynamics.npz, dynamics.png.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cka_jax.analysis.cca_measures import same_layer
from cka_jax.analysis.entry import Analysis, Inapplicable, all_checks, check_examples, main_population
from cka_jax.analysis.notes import line_note, with_note
from cka_jax.analysis.outputs import Section, Table, write_npz
from cka_jax.analysis.plots import add_note, colormap, short_name, subplots
from cka_jax.analysis.undefined import LayerStatus, defined_rows, left_out, mean_of_defined, number

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext


def similarity_to_final(measure: str, reps: Mapping[str, np.ndarray], final: Mapping[str, np.ndarray]) -> np.ndarray:
    """(M, L) similarity of each model's layers (name -> (M, n, ...)) with the final network's."""
    return same_layer(measure, reps, final)


def plot_dynamics(
    values: Mapping[str, np.ndarray], fractions: Sequence[float], layer_names: Sequence[str], title: str, note: str = ""
):
    """One panel per measure: similarity to the final network per layer (mean over the seeds whose
    every layer is defined), one line per checkpoint (training fraction); `note` under the
    figure. values: measure -> (S, M, L)."""
    fig, axes = subplots(1, len(values), figsize=(6.5 * len(values), 4), squeeze=False)
    colors = colormap("plasma")(np.linspace(0, 0.85, len(fractions)))
    x = np.arange(len(layer_names))
    for ax, (measure, v) in zip(axes[0], values.items(), strict=True):
        for color, fraction, row in zip(colors, fractions, v, strict=True):
            ax.plot(x, mean_of_defined(row)[0], marker="o", color=color, label=f"{fraction:.0%} of training")
        ax.set_xticks(x, [short_name(n) for n in layer_names], rotation=90, fontsize=8)
        ax.set(ylim=(0, 1.02), ylabel=f"{measure} with the final network", title=measure)
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    add_note(fig, note)
    return fig


_MEASURES = ("svcca", "cka")


def section(ctx: AnalysisContext) -> Section:
    """Raghu et al. 2017: each layer at kept checkpoints vs the final network (SVCCA and CKA)."""
    p = ctx.main
    steps = ctx.earlier_checkpoint_steps(p)
    final = ctx.pooled_blocks(p)
    final_status = LayerStatus.of(final)
    per_step: dict[str, list[np.ndarray]] = {m: [] for m in _MEASURES}
    notes = []
    for step in ctx.progress(steps, desc="checkpoints", leave=False):
        reps = ctx.pooled_blocks(ctx.at_step(p, step))
        status = LayerStatus.of(reps)
        for m in _MEASURES:
            per_step[m].append(similarity_to_final(m, reps, final))

        def why(k: int, status: LayerStatus = status) -> str:
            reasons = (status.why([k]), final_status.why([k]))
            return "; ".join(r for r in reasons if r) or "CCA is degenerate for these shapes"

        note = left_out(defined_rows(per_step["svcca"][-1]) & defined_rows(per_step["cka"][-1]), why)
        notes.append(f"step {step}: {note}" if note else "")
    values = {m: np.stack(v) for m, v in per_step.items()}
    fractions = [s / p.step for s in steps]
    names = list(final)
    write_npz(ctx.path("dynamics.npz"), steps=np.array(steps), final_step=p.step, layer_names=np.array(names), **values)
    note = "; ".join(n for n in notes if n)
    fig = plot_dynamics(
        values, fractions, names, f"{p.name}: layers during training vs the final network", line_note(note)
    )
    rows = [
        [f"{s} ({f:.0%})"] + [number(v, 2, "every seed undefined") for v in mean_of_defined(values["svcca"][i])[0]]
        for i, (s, f) in enumerate(zip(steps, fractions, strict=True))
    ]
    text = (
        "Each kept checkpoint's block outputs (spatially averaged, same test examples) against the same layer "
        "of the same seed at the end of training. Raghu et al. find networks converge bottom-up: early layers "
        "reach their final representation first."
    )
    table = Table(
        ["step"] + [short_name(n) for n in names],
        rows,
        "SVCCA with the final network, mean over the seeds whose every layer is defined"
        + (f" ({note})" if note else ""),
    )
    return Section(
        "dynamics",
        "Learning dynamics",
        with_note(text, note),
        [ctx.save_figure(fig, "dynamics")],
        [table],
        ["dynamics.npz"],
    )


def check_checkpoints(ctx: AnalysisContext) -> None:
    """Inapplicable unless the main population kept a checkpoint before the one analysed."""
    if not ctx.earlier_checkpoint_steps(ctx.main):
        raise Inapplicable(
            f"learning dynamics needs checkpoints before the final one; {ctx.main.workdir!r} kept "
            f"only step {ctx.main.step} (see checkpoint.keep_at_fractions)"
        )


ANALYSIS = Analysis(
    "dynamics",
    section,
    description="learning dynamics: checkpoints vs final (Raghu et al.)",
    check=all_checks(check_checkpoints, check_examples(main_population, "learning dynamics (SVCCA)")),
)
