"""An analysis's registry entry, and the applicability checks several analyses share.

Each analysis module declares its entry beside its code, e.g.

    ANALYSIS = Analysis("blocks", section, description="block structure ... (Fig. 2, D.2)")

and `cka_jax.analysis.registry` lists the entries in report order. A check runs before anything
is written: it raises `AnalysisInputError` when an option makes the analysis impossible, and
`Inapplicable` when the populations do not allow it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cka_jax.analysis.errors import AnalysisInputError

if TYPE_CHECKING:
    from cka_jax.analysis.context import AnalysisContext
    from cka_jax.analysis.inputs import TrainedPopulation
    from cka_jax.analysis.outputs import Section


class Inapplicable(AnalysisInputError):
    """The populations do not allow an analysis (e.g. one model, no residual connections): an
    analysis chosen by default is skipped with a note, one asked for by name is refused."""


Check = Callable[["AnalysisContext"], None]
Populations = Callable[["AnalysisContext"], Sequence["TrainedPopulation"]]


@dataclasses.dataclass(frozen=True)
class Analysis:
    """name: the --analyses name and the report section's id; run(ctx) writes the analysis's
    numbers and figures and returns its report section."""

    name: str
    run: Callable[[AnalysisContext], Section]
    needs_compare: bool = False  # runs only when comparison populations are given
    needs_images: bool = True  # needs the models and test images (else: predictions only)
    description: str = ""
    always: bool = False  # runs whatever the selection (cheap, and the report opens with it)
    check: Check | None = None  # raises before anything is written if the analysis cannot run


def main_population(ctx: AnalysisContext) -> list[TrainedPopulation]:
    return [ctx.main]


def all_populations(ctx: AnalysisContext) -> list[TrainedPopulation]:
    return ctx.populations


def check_models(populations: Populations, what: str, use_max_models: bool = True) -> Check:
    """Two models per population: AnalysisInputError if --max_models forbids it, Inapplicable if
    a population has fewer."""

    def check(ctx: AnalysisContext) -> None:
        if use_max_models and ctx.options.max_models < 2:
            raise AnalysisInputError(
                f"--max_models={ctx.options.max_models} leaves {what} one model per population; "
                "use --max_models >= 2, or leave it out of --analyses"
            )
        for p in populations(ctx):
            if p.size < 2:
                raise Inapplicable(f"{what} needs at least 2 models; {p.workdir!r} has {p.size}")

    return check


def check_examples(populations: Populations, what: str) -> Check:
    """CCA of pooled block outputs needs more examples than channels + 1 (see cka_jax.cca):
    AnalysisInputError if --max_examples is too few, Inapplicable if the test set is."""

    def check(ctx: AnalysisContext) -> None:
        widest = max(ctx.widest_block(p) for p in populations(ctx))
        need, available = widest + 2, len(ctx.test.labels)
        if min(ctx.options.max_examples, available) >= need:
            return
        if available < need:
            raise Inapplicable(
                f"{what} needs at least {need} test examples (CCA needs more than the widest block "
                f"output's {widest} channels + 1); the test set has {available}"
            )
        raise AnalysisInputError(
            f"--max_examples={ctx.options.max_examples} is too few for {what}: CCA needs more "
            f"examples than the widest block output's {widest} channels + 1; use "
            f"--max_examples >= {need}, or leave it out of --analyses"
        )

    return check


def all_checks(*checks: Check) -> Check:
    """One check running `checks` in order."""

    def check(ctx: AnalysisContext) -> None:
        for c in checks:
            c(ctx)

    return check
