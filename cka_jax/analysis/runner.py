"""Running a chosen set of analyses on trained workdirs: outputs, report sections, failures.

`load_context` and `run_analyses` validate every input before any work (an analysis that the
options make impossible is refused, one the populations do not allow is skipped with a note),
then each analysis runs in turn, stores its section and rebuilds `report.html`; an analysis
that fails is logged and reported at the end, and never removes what earlier runs or analyses
wrote.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from cka_jax.workdir import metrics_log
from cka_jax.analysis import report
from cka_jax.train import loop as trainer
from cka_jax.analysis import sections
from cka_jax.analysis.context import AnalysisContext, AnalysisOptions
from cka_jax.analysis.outputs import Section, check_writable_directory
from cka_jax.analysis.representations import Progress, no_progress
from cka_jax.analysis.inputs import (AnalysisInputError, Population, check_comparable, check_workdir,
                                      checkpoint_steps, load_labels, load_population, load_test_labels, load_test_set,
                                      population_name)
from cka_jax.models import representation_shapes

logger = logging.getLogger(__name__)


class Inapplicable(AnalysisInputError):
    """The populations do not allow an analysis (e.g. one model, no residual connections): an
    analysis chosen by default is skipped with a note, one asked for by name is refused."""


Check = Callable[[AnalysisContext], None]
_MAIN = lambda ctx: [ctx.main]
_ALL = lambda ctx: ctx.populations


def _check_models(populations: Callable[[AnalysisContext], Sequence[Population]], what: str,
                  use_max_models: bool = True) -> Check:
    """Two models per population: AnalysisInputError if --max_models forbids it, Inapplicable if
    a population has fewer."""
    def check(ctx: AnalysisContext) -> None:
        if use_max_models and ctx.options.max_models < 2:
            raise AnalysisInputError(f"--max_models={ctx.options.max_models} leaves {what} one model per population; "
                                     "use --max_models >= 2, or leave it out of --analyses")
        for p in populations(ctx):
            if p.size < 2:
                raise Inapplicable(f"{what} needs at least 2 models; {p.workdir!r} has {p.size}")
    return check


def _widest_block(ctx: AnalysisContext, population: Population) -> int:
    """Channels of the widest block output (or stem) of `population`'s architecture."""
    key = ("widest", population.workdir)
    if key not in ctx.cache:
        shapes = representation_shapes(population.model, (1,) + trainer.image_shape(population.config), "blocks")
        ctx.cache[key] = max(s.shape[-1] for s in shapes.values())
    return ctx.cache[key]


def _check_examples(populations: Callable[[AnalysisContext], Sequence[Population]], what: str) -> Check:
    """CCA of pooled block outputs needs more examples than channels + 1 (see cka_jax.cca):
    AnalysisInputError if --max_examples is too few, Inapplicable if the test set is."""
    def check(ctx: AnalysisContext) -> None:
        widest = max(_widest_block(ctx, p) for p in populations(ctx))
        need, available = widest + 2, len(ctx.test.labels)
        if min(ctx.options.max_examples, available) >= need:
            return
        if available < need:
            raise Inapplicable(f"{what} needs at least {need} test examples (CCA needs more than the widest block "
                               f"output's {widest} channels + 1); the test set has {available}")
        raise AnalysisInputError(f"--max_examples={ctx.options.max_examples} is too few for {what}: CCA needs more "
                                 f"examples than the widest block output's {widest} channels + 1; use "
                                 f"--max_examples >= {need}, or leave it out of --analyses")
    return check


def _check_residual(ctx: AnalysisContext) -> None:
    if not ctx.main.config.model.residual:
        raise Inapplicable(f"block deletion needs residual connections; {ctx.main.workdir!r} was trained without")


def _check_checkpoints(ctx: AnalysisContext) -> None:
    if not [s for s in checkpoint_steps(ctx.main.workdir) if s < ctx.main.step]:
        raise Inapplicable(f"learning dynamics needs checkpoints before the final one; {ctx.main.workdir!r} kept "
                           f"only step {ctx.main.step} (see checkpoint.keep_at_fractions)")


def _check_predictions(ctx: AnalysisContext) -> None:
    """Reads and checks every population's predictions (cached for the analysis)."""
    _check_models(_ALL, "per-class disagreement", use_max_models=False)(ctx)
    for p in ctx.populations:
        ctx.correct(p)


def _all_checks(*checks: Check) -> Check:
    def check(ctx: AnalysisContext) -> None:
        for c in checks:
            c(ctx)
    return check


@dataclasses.dataclass(frozen=True)
class Analysis:
    name: str
    run: Callable[[AnalysisContext], Section]
    needs_compare: bool = False   # runs only when comparison populations are given
    needs_images: bool = True     # needs the models and test images (else: predictions only)
    description: str = ""
    always: bool = False          # runs whatever the selection (cheap, and the report opens with it)
    check: Check | None = None    # raises before anything is written if the analysis cannot run


ANALYSES: dict[str, Analysis] = {a.name: a for a in (
    Analysis("training", sections.training, needs_images=False, always=True,
             description="training curves from metrics.jsonl: diverged and under-trained seeds (always runs)"),
    Analysis("within", sections.within, description="within-model CKA heatmaps (Fig. 1, C.1, D.1)"),
    Analysis("blocks", sections.blocks, description="block structure detection and sweep grid (Fig. 2, D.2)"),
    Analysis("pcs", sections.principal_components, description="first principal component (Fig. 3, D.5)"),
    Analysis("probes", sections.probes, description="linear probes per layer (Fig. 4)"),
    Analysis("deletion", sections.deletion, description="block deletion accuracy (Fig. 5)", check=_check_residual),
    Analysis("seeds", sections.seeds, description="CKA across seeds (Fig. 6)",
             check=_check_models(_MAIN, "cross-seed CKA")),
    Analysis("cca", sections.cca, description="SVCCA and PWCCA heatmaps, within model and across seeds",
             check=_check_examples(_MAIN, "SVCCA and PWCCA")),
    Analysis("matching", sections.matching, description="cross-seed unit matching (Li et al. 2016)",
             check=_check_models(_MAIN, "unit matching")),
    Analysis("sparse", sections.sparse, description="sparse prediction of units across seeds (Li et al. 2016)",
             check=_check_models(_MAIN, "sparse prediction")),
    Analysis("dynamics", sections.dynamics, description="learning dynamics: checkpoints vs final (Raghu et al.)",
             check=_all_checks(_check_checkpoints, _check_examples(_MAIN, "learning dynamics (SVCCA)"))),
    Analysis("architectures", sections.architectures, needs_compare=True,
             description="CKA across architectures (Fig. E.1)"),
    Analysis("disagreement", sections.disagreement, needs_compare=True, needs_images=False,
             description="per-example and per-class disagreement (Fig. 7, F.1-F.4)", check=_check_predictions),
    Analysis("convergence", sections.convergence, needs_compare=True,
             description="cross-seed PWCCA per population: memorising vs generalising, narrow vs wide",
             check=_all_checks(_check_models(_ALL, "cross-seed PWCCA"), _check_examples(_ALL, "cross-seed PWCCA"))),
)}


class AnalysesFailed(RuntimeError):
    """Some analyses raised; the others' outputs are written."""


def choose_analyses(names: Sequence[str] | None, has_compare: bool, has_images: bool = True) -> list[str]:
    """The analyses to run, in canonical order: `names`, or every analysis that applies; those
    marked `always` (the training curves) in any case.
    has_images: the test images can be held in memory (False for streamed data sets)."""
    unknown = [n for n in names or () if n not in ANALYSES]
    if unknown:
        raise AnalysisInputError(f"unknown analysis name(s) {unknown}; choose from {', '.join(ANALYSES)}")
    runnable = [n for n, a in ANALYSES.items() if has_images or not a.needs_images]
    if names:
        missing = [n for n in names if ANALYSES[n].needs_compare and not has_compare]
        if missing:
            raise AnalysisInputError(f"analysis {missing} compares populations: pass --compare <workdir>")
        imageless = [n for n in ANALYSES if n in names and n not in runnable]
        if imageless:
            raise AnalysisInputError(
                f"analyses {imageless} need the test images in memory, but this data set is streamed; its "
                f"populations are analysed from predictions/test.npz by: {', '.join(runnable)}")
        return [n for n in runnable if n in names or ANALYSES[n].always]
    return [n for n in runnable if has_compare or not ANALYSES[n].needs_compare]


def needs_images(names: Sequence[str]) -> bool:
    """Whether any of the analyses `names` needs the restored models and the test images."""
    return any(ANALYSES[n].needs_images for n in names)


def load_context(workdir: str, compare: Sequence[str] = (), outdir: str | None = None,
                 options: AnalysisOptions = AnalysisOptions(), progress: Progress = no_progress,
                 images: bool = True) -> AnalysisContext:
    """Checks that the populations of `workdir` and `compare` share a test set and that the output
    directory can be written, then loads them: with `images`, the restored models and the test
    images; without, the predictions' labels only. Writes nothing."""
    workdirs = [workdir, *compare]
    if len({os.path.abspath(w) for w in workdirs}) != len(workdirs):
        raise AnalysisInputError(f"each workdir may appear once; got {workdirs}")
    check_comparable(workdirs, [check_workdir(w) for w in workdirs])
    outdir = outdir or os.path.join(workdir, "analysis")
    try:
        check_writable_directory(outdir)
    except OSError as error:
        raise AnalysisInputError(f"cannot write the analysis to --outdir {outdir!r} ({error}); choose a "
                                 "directory you can write") from error
    names = [population_name(w) for w in workdirs]
    names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
    populations = [load_population(w, name=n, restore=images) for w, n in zip(workdirs, names)]
    config = populations[0].config
    test = load_test_set(config) if images else load_test_labels(workdir, config)
    for population in populations:
        if os.path.exists(os.path.join(population.workdir, "predictions", "test.npz")):
            labels = load_labels(population.workdir, test.num_classes)
            if labels.shape != test.labels.shape or not np.array_equal(labels, test.labels):
                raise AnalysisInputError(
                    f"the test set of {population.workdir!r} ({labels.shape[0]} labels in predictions/test.npz) "
                    f"is not the {test.dataset} test set of {workdir!r} ({test.labels.shape[0]} labels)")
    ctx = AnalysisContext(populations, test, outdir, options, progress)
    for population in populations:
        status = _training_status(ctx, population)
        if status:
            logger.warning("%s%s", population.workdir, status)
    return ctx


def check_analyses(ctx: AnalysisContext, names: Sequence[str], skip_inapplicable: bool = True) -> list[str]:
    """The analyses of `names` that can run on `ctx`. Raises AnalysisInputError when an option
    makes one impossible, or when the populations do not allow one asked for and
    `skip_inapplicable` is False; otherwise such an analysis is left out and noted in
    ctx.skipped. Reads (and caches) what the checks need; writes nothing."""
    runnable = []
    for name in names:
        check = ANALYSES[name].check
        try:
            if check is not None:
                check(ctx)
        except Inapplicable as error:
            if not skip_inapplicable:
                raise
            ctx.skipped[name] = str(error)
            logger.info("%s: not run: %s", name, error)
            continue
        runnable.append(name)
    return runnable


def training_status(population: Population) -> str:
    """'' for a finished run; otherwise why its checkpoint is not a trained population (read from
    predictions/test.npz, which training writes only at the end of a run that did not diverge, and
    the rows of metrics.jsonl that training marked diverged)."""
    if os.path.exists(os.path.join(population.workdir, "predictions", "test.npz")):
        return ""
    try:
        rows = metrics_log.read(metrics_log.path_in(population.workdir))
    except (OSError, ValueError):
        rows = []
    diverged = sorted({row.get("model") for row in rows if row.get("diverged") is True}, key=str)
    why = (f"training DIVERGED (models {', '.join(map(str, diverged))}) and stopped" if diverged else
           "training has not finished (stopped, interrupted or still running)")
    return (f" — {why}: there is no predictions/test.npz, and what is analysed is the checkpoint at step "
            f"{population.step}, not a trained population")


def _training_status(ctx: AnalysisContext, population: Population) -> str:
    """`training_status` of `population`, read once per run (the report's intro is rebuilt after
    every analysis)."""
    key = ("training_status", population.workdir, population.step)
    if key not in ctx.cache:
        ctx.cache[key] = training_status(population)
    return ctx.cache[key]


def report_intro(ctx: AnalysisContext) -> str:
    lines = [f"{p.name}: {p.describe()}; checkpoint step {p.step}; workdir {os.path.abspath(p.workdir)}"
             f"{_training_status(ctx, p)}" for p in ctx.populations]
    source = (" Heatmaps put the first layer at the bottom left." if ctx.test.images is not None else
              " These analyses read the populations' predictions/test.npz, not their models or the test images.")
    caveat = ("\n\nDigits is easy enough that every layer of every network looks alike (a ceiling effect): "
              "these results show the pipeline, not evidence for or against the paper's findings, which need "
              "CIFAR populations." if ctx.test.dataset == "digits" else "")
    skipped = "".join(f"\n\nNot run: {name} ({why})." for name, why in ctx.skipped.items())
    return ("Populations analysed (the first is the main one):\n\n" + "\n\n".join(lines) +
            f"\n\nTest set: {ctx.test.dataset}, {len(ctx.test.labels)} examples." + source + caveat + skipped)


def run_analyses(ctx: AnalysisContext, names: Sequence[str], progress: Progress = no_progress,
                 skip_inapplicable: bool = True) -> list[str]:
    """Checks `names` (see `check_analyses`: nothing is written if one cannot run), then runs them
    in order, writing outputs and rebuilding the report after each; returns the report sections
    written. Raises AnalysesFailed after running all if any failed."""
    names = check_analyses(ctx, names, skip_inapplicable)
    try:
        os.makedirs(ctx.outdir, exist_ok=True)
    except OSError as error:
        raise AnalysisInputError(f"cannot create --outdir {ctx.outdir!r} ({error})") from error
    failed, done = [], []
    for name in progress(names, desc="analyses"):
        start = time.perf_counter()
        try:
            section = ANALYSES[name].run(ctx)
        except Exception:
            logger.exception("analysis %r failed; its earlier outputs are left as they were", name)
            failed.append(name)
            continue
        report.save_section(ctx.outdir, section)
        report.write_report(ctx.outdir, f"Analysis of {ctx.main.name}", report_intro(ctx), list(ANALYSES))
        done.append(name)
        logger.info("%s: done in %.1f s", name, time.perf_counter() - start)
    if failed:
        raise AnalysesFailed(f"analyses {failed} failed (see the log above); the others are in {ctx.outdir}")
    return done
