"""Running a chosen set of analyses on trained workdirs: outputs, report sections, failures.

`run_analyses` validates every input before any work, runs each analysis in turn, stores its
section and rebuilds `report.html` after each one; an analysis that fails is logged and
reported at the end, and never removes what earlier runs or analyses wrote.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from cka_jax import report, trainer
from cka_jax.analysis import sections
from cka_jax.analysis.context import AnalysisContext, AnalysisOptions
from cka_jax.analysis.outputs import Section
from cka_jax.analysis.representations import Progress, no_progress
from cka_jax.analysis.workdir import (AnalysisInputError, check_comparable, check_workdir, load_labels,
                                      load_population, load_test_labels, load_test_set, population_name)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Analysis:
    name: str
    run: Callable[[AnalysisContext], Section]
    needs_compare: bool = False   # runs only when comparison populations are given
    needs_images: bool = True     # needs the models and test images (else: predictions only)
    description: str = ""


ANALYSES: dict[str, Analysis] = {a.name: a for a in (
    Analysis("within", sections.within, description="within-model CKA heatmaps (Fig. 1, C.1, D.1)"),
    Analysis("blocks", sections.blocks, description="block structure detection and sweep grid (Fig. 2, D.2)"),
    Analysis("pcs", sections.principal_components, description="first principal component (Fig. 3, D.5)"),
    Analysis("probes", sections.probes, description="linear probes per layer (Fig. 4)"),
    Analysis("deletion", sections.deletion, description="block deletion accuracy (Fig. 5)"),
    Analysis("seeds", sections.seeds, description="CKA across seeds (Fig. 6)"),
    Analysis("cca", sections.cca, description="SVCCA and PWCCA heatmaps, within model and across seeds"),
    Analysis("matching", sections.matching, description="cross-seed unit matching (Li et al. 2016)"),
    Analysis("sparse", sections.sparse, description="sparse prediction of units across seeds (Li et al. 2016)"),
    Analysis("dynamics", sections.dynamics, description="learning dynamics: checkpoints vs final (Raghu et al.)"),
    Analysis("architectures", sections.architectures, needs_compare=True,
             description="CKA across architectures (Fig. E.1)"),
    Analysis("disagreement", sections.disagreement, needs_compare=True, needs_images=False,
             description="per-example and per-class disagreement (Fig. 7, F.1-F.4)"),
    Analysis("convergence", sections.convergence, needs_compare=True,
             description="cross-seed PWCCA per population: memorising vs generalising, narrow vs wide"),
)}


class AnalysesFailed(RuntimeError):
    """Some analyses raised; the others' outputs are written."""


def choose_analyses(names: Sequence[str] | None, has_compare: bool, has_images: bool = True) -> list[str]:
    """The analyses to run, in canonical order: `names`, or every analysis that applies.
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
        return [n for n in runnable if n in names]
    chosen = [n for n in runnable if has_compare or not ANALYSES[n].needs_compare]
    if not chosen:
        raise AnalysisInputError(f"nothing to analyse: on a streamed data set only {', '.join(runnable)} runs, "
                                 f"and it compares populations: pass --compare <workdir>")
    return chosen


def needs_images(names: Sequence[str]) -> bool:
    """Whether any of the analyses `names` needs the restored models and the test images."""
    return any(ANALYSES[n].needs_images for n in names)


def load_context(workdir: str, compare: Sequence[str] = (), outdir: str | None = None,
                 options: AnalysisOptions = AnalysisOptions(), progress: Progress = no_progress,
                 images: bool = True) -> AnalysisContext:
    """Checks that the populations of `workdir` and `compare` share a test set and loads them: with
    `images`, the restored models and the test images; without, the predictions' labels only."""
    workdirs = [workdir, *compare]
    if len({os.path.abspath(w) for w in workdirs}) != len(workdirs):
        raise AnalysisInputError(f"each workdir may appear once; got {workdirs}")
    for w in workdirs:
        check_workdir(w)
    check_comparable(workdirs, [trainer.load_config(w) for w in workdirs])
    names = [population_name(w) for w in workdirs]
    names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
    populations = [load_population(w, name=n, restore=images) for w, n in zip(workdirs, names)]
    config = populations[0].config
    test = load_test_set(config) if images else load_test_labels(workdir, config)
    for population in populations:
        if os.path.exists(os.path.join(population.workdir, "predictions", "test.npz")):
            labels = load_labels(population.workdir)
            if labels.shape != test.labels.shape or not np.array_equal(labels, test.labels):
                raise AnalysisInputError(
                    f"the test set of {population.workdir!r} ({labels.shape[0]} labels in predictions/test.npz) "
                    f"is not the {test.dataset} test set of {workdir!r} ({test.labels.shape[0]} labels)")
    return AnalysisContext(populations, test, outdir or os.path.join(workdir, "analysis"), options, progress)


def report_intro(ctx: AnalysisContext) -> str:
    lines = [f"{p.name}: {p.describe()}; checkpoint step {p.step}; workdir {os.path.abspath(p.workdir)}"
             for p in ctx.populations]
    source = (" Heatmaps put the first layer at the bottom left." if ctx.test.images is not None else
              " These analyses read the populations' predictions/test.npz, not their models or the test images.")
    caveat = ("\n\nDigits is easy enough that every layer of every network looks alike (a ceiling effect): "
              "these results show the pipeline, not evidence for or against the paper's findings, which need "
              "CIFAR populations." if ctx.test.dataset == "digits" else "")
    return ("Populations analysed (the first is the main one):\n\n" + "\n\n".join(lines) +
            f"\n\nTest set: {ctx.test.dataset}, {len(ctx.test.labels)} examples." + source + caveat)


def run_analyses(ctx: AnalysisContext, names: Sequence[str], progress: Progress = no_progress) -> list[str]:
    """Runs `names` in order, writing outputs and rebuilding the report after each; returns the
    report sections written. Raises AnalysesFailed after running all if any failed."""
    os.makedirs(ctx.outdir, exist_ok=True)
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
