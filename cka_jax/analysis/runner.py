"""Running a chosen set of analyses on trained workdirs: outputs, report sections, failures.

`load_context` and `run_analyses` validate every input before any work (an analysis that the
options make impossible is refused, one the populations do not allow is skipped with a note),
then each analysis runs in turn, stores its section and rebuilds `report.html`; an analysis
that fails is logged and reported at the end, and never removes what earlier runs or analyses
wrote.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from cka_jax.analysis import report
from cka_jax.analysis.context import AnalysisContext, AnalysisOptions
from cka_jax.analysis.entry import Analysis, Inapplicable
from cka_jax.analysis.inputs import (
    AnalysisInputError,
    TrainedPopulation,
    check_comparable,
    check_workdir,
    load_labels,
    load_population,
    load_test_labels,
    load_test_set,
    population_name,
)
from cka_jax.analysis.outputs import check_writable_directory
from cka_jax.analysis.registry import ANALYSES
from cka_jax.analysis.representations import ProgressFactory, no_progress
from cka_jax.workdir import PREDICTIONS, Workdir, metrics_log

__all__ = [  # what callers use, wherever it is defined
    "ANALYSES",
    "Analysis",
    "AnalysesFailed",
    "Inapplicable",
    "check_analyses",
    "choose_analyses",
    "load_context",
    "needs_images",
    "report_intro",
    "run_analyses",
    "training_status",
]

logger = logging.getLogger(__name__)
DEFAULT_OPTIONS = AnalysisOptions()


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
                f"populations are analysed from {PREDICTIONS} by: {', '.join(runnable)}"
            )
        return [n for n in runnable if n in names or ANALYSES[n].always]
    return [n for n in runnable if has_compare or not ANALYSES[n].needs_compare]


def needs_images(names: Sequence[str]) -> bool:
    """Whether any of the analyses `names` needs the restored models and the test images."""
    return any(ANALYSES[n].needs_images for n in names)


def load_context(
    workdir: str,
    compare: Sequence[str] = (),
    outdir: str | None = None,
    options: AnalysisOptions = DEFAULT_OPTIONS,
    progress: ProgressFactory = no_progress,
    images: bool = True,
) -> AnalysisContext:
    """Checks that the populations of `workdir` and `compare` share a test set and that the output
    directory can be written, then loads them: with `images`, the restored models and the test
    images; without, the predictions' labels only. Writes nothing."""
    workdirs = [workdir, *compare]
    _check_distinct(workdirs)
    check_comparable(workdirs, [check_workdir(w) for w in workdirs])
    outdir = outdir or Workdir(workdir).analysis
    try:
        check_writable_directory(outdir)
    except OSError as error:
        raise AnalysisInputError(
            f"cannot write the analysis to --outdir {outdir!r} ({error}); choose a directory you can write"
        ) from error
    names = [population_name(w) for w in workdirs]
    names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
    populations = [load_population(w, name=n, restore=images) for w, n in zip(workdirs, names, strict=True)]
    config = populations[0].config
    test = load_test_set(config) if images else load_test_labels(workdir, config)
    for population in populations:
        if os.path.exists(Workdir(population.workdir).predictions):
            labels = load_labels(population.workdir, test.num_classes)
            if labels.shape != test.labels.shape or not np.array_equal(labels, test.labels):
                raise AnalysisInputError(
                    f"the test set of {population.workdir!r} ({labels.shape[0]} labels in {PREDICTIONS}) "
                    f"is not the {test.dataset} test set of {workdir!r} ({test.labels.shape[0]} labels)"
                )
    ctx = AnalysisContext(populations, test, outdir, options, progress)
    for population in populations:
        status = _training_status(ctx, population)
        if status:
            logger.warning("%s%s", population.workdir, status)
    return ctx


def _directory_identity(path: str) -> tuple[int, int] | str:
    """What makes two paths the same directory: device and inode (through symlinks, bind mounts
    and `..`), or the real path of one that cannot be read."""
    try:
        info = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return info.st_dev, info.st_ino


def _check_distinct(workdirs: Sequence[str]) -> None:
    """AnalysisInputError naming a workdir of `workdirs` (--workdir, then the --compare ones) that
    is the same directory as an earlier one, however it is spelled (a symlink, a relative path):
    a population compared with itself."""
    seen: dict[tuple[int, int] | str, int] = {}
    for i, path in enumerate(workdirs):
        first = seen.setdefault(_directory_identity(path), i)
        if first != i:
            earlier = "--workdir" if first == 0 else "--compare"
            raise AnalysisInputError(
                f"--compare {path!r} is the same directory as {earlier} {workdirs[first]!r}: a population would "
                "be compared with itself; each workdir may appear once, so compare a different one"
            )


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


def training_status(population: TrainedPopulation) -> str:
    """'' for a finished run; otherwise why its checkpoint is not a trained population (read from
    predictions/test.npz, which training writes only at the end of a run that did not diverge, and
    the rows of metrics.jsonl that training marked diverged)."""
    if os.path.exists(Workdir(population.workdir).predictions):
        return ""
    try:
        rows = metrics_log.read(Workdir(population.workdir).metrics)
    except (OSError, ValueError):
        rows = []
    diverged = sorted({row.get("model") for row in rows if row.get("diverged") is True}, key=str)
    why = (
        f"training DIVERGED (models {', '.join(map(str, diverged))}) and stopped"
        if diverged
        else "training has not finished (stopped, interrupted or still running)"
    )
    return (
        f" — {why}: there is no {PREDICTIONS}, and what is analysed is the checkpoint at step "
        f"{population.step}, not a trained population"
    )


def _training_status(ctx: AnalysisContext, population: TrainedPopulation) -> str:
    """`training_status` of `population`, read once per run (the report's intro is rebuilt after
    every analysis)."""
    key = ("training_status", population.workdir, population.step)
    if key not in ctx.cache:
        ctx.cache[key] = training_status(population)
    return ctx.cache[key]


def report_intro(ctx: AnalysisContext) -> str:
    lines = [
        f"{p.name}: {p.describe()}; checkpoint step {p.step}; workdir {os.path.abspath(p.workdir)}"
        f"{_training_status(ctx, p)}"
        for p in ctx.populations
    ]
    source = (
        " Heatmaps put the first layer at the bottom left."
        if ctx.test.images is not None
        else f" These analyses read the populations' {PREDICTIONS}, not their models or the test images."
    )
    caveat = (
        "\n\nDigits is easy enough that every layer of every network looks alike (a ceiling effect): "
        "these results show the pipeline, not evidence for or against the paper's findings, which need "
        "CIFAR populations."
        if ctx.test.dataset == "digits"
        else ""
    )
    skipped = "".join(f"\n\nNot run: {name} ({why})." for name, why in ctx.skipped.items())
    return (
        "Populations analysed (the first is the main one):\n\n"
        + "\n\n".join(lines)
        + f"\n\nTest set: {ctx.test.dataset}, {len(ctx.test.labels)} examples."
        + source
        + caveat
        + skipped
    )


def run_analyses(
    ctx: AnalysisContext, names: Sequence[str], progress: ProgressFactory = no_progress, skip_inapplicable: bool = True
) -> list[str]:
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
