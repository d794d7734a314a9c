"""What every analysis gets: the populations, their test set, options, output paths, caches, and
the inputs beyond them (training set, earlier checkpoints, class names), so that analysis modules
read nothing from a workdir themselves."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from cka_jax.analysis import inputs
from cka_jax.analysis.inputs import TestSet, TrainedPopulation
from cka_jax.analysis.layer_heatmaps import LayerHeatmaps, within_cka
from cka_jax.analysis.outputs import save_figure
from cka_jax.analysis.representations import ProgressFactory, collect, no_progress
from cka_jax.analysis.undefined import LayerStatus
from cka_jax.models import representation_names


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """Knobs of the analyses (CLI flags map onto these one to one)."""

    batch_size: int = 256  # CKA minibatch size (equal batches of at most this many)
    passes: int = 1  # passes over the test set for minibatch CKA (paper: 10)
    max_examples: int = 1000  # test examples for PCs, CCA, unit matching, sparse prediction
    max_models: int = 4  # models per population used by pairwise (cross-seed) analyses
    block_threshold: float = 0.85  # pairwise CKA inside a block structure
    block_min_layers: int = 3
    probe_steps: int = 300  # full-batch optimizer steps per linear probe
    probe_examples: int = 5000  # training examples the probes are fitted on
    alpha: float = 0.05  # significance level of the per-class tests
    fdr: bool = False  # Benjamini-Hochberg correction of the per-class tests
    num_bootstrap: int = 1000  # bootstrap resamples for intervals
    level: float = 0.95  # confidence level of intervals
    seed: int = 0

    def __post_init__(self) -> None:
        """ValueError naming the first option out of range (see `_OPTION_RULES`)."""
        for name, (check, rule) in _OPTION_RULES.items():
            value = getattr(self, name)
            if not check(value):
                raise ValueError(f"{name}={value!r}: must be {rule}")


def _integer(minimum: int, maximum: float = math.inf):
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and minimum <= int(v) <= maximum


def _open_unit(closed_right: bool = False):
    def check(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return False
        x = float(v)
        return 0 < x <= 1 if closed_right else 0 < x < 1

    return check


# Minibatch HSIC (and the PCs' full-batch CKA) needs 4 examples; seeds feed numpy and jax PRNGs,
# which take non-negative 32-bit values; 100 000 bootstrap resamples already settle a percentile
# interval to well below its width, and more only cost memory.
_OPTION_RULES = {
    "batch_size": (_integer(4), "an integer >= 4 (minibatch HSIC needs at least 4 examples per batch)"),
    "passes": (_integer(1), "an integer >= 1 (passes over the test set)"),
    "max_examples": (_integer(4), "an integer >= 4 (CKA needs at least 4 examples)"),
    "max_models": (_integer(1), "an integer >= 1"),
    "block_threshold": (_open_unit(closed_right=True), "a number in (0, 1] (a CKA value)"),
    "block_min_layers": (_integer(2), "an integer >= 2"),
    "probe_steps": (_integer(1), "an integer >= 1"),
    "probe_examples": (_integer(2), "an integer >= 2"),
    "alpha": (_open_unit(), "a number in (0, 1) (a significance level)"),
    "fdr": (lambda v: isinstance(v, bool), "True or False"),
    "num_bootstrap": (_integer(1, 100_000), "an integer in [1, 100000]"),
    "level": (_open_unit(), "a number in (0, 1) (a confidence level)"),
    "seed": (_integer(0, 2**32 - 1), "an integer in [0, 2**32 - 1]"),
}


@dataclasses.dataclass
class AnalysisContext:
    """populations[0] is the population analysed; the rest come from --compare."""

    populations: list[TrainedPopulation]
    test: TestSet
    outdir: str
    options: AnalysisOptions = AnalysisOptions()
    progress: ProgressFactory = no_progress
    cache: dict[Any, Any] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # analysis -> why it did not run

    @property
    def main(self) -> TrainedPopulation:
        return self.populations[0]

    def path(self, name: str) -> str:
        """Absolute path of an output file name inside the analysis directory."""
        return os.path.join(self.outdir, name)

    def save_figure(self, fig, stem: str) -> str:
        """Saves `fig` as `<stem>.png` and `.pdf` in the analysis directory; returns the PNG's
        name (relative, for the report section)."""
        save_figure(fig, self.path(stem))
        return f"{stem}.png"

    def within(self, population: TrainedPopulation) -> LayerHeatmaps:
        """All-layer within-model CKA of `population`, computed once per run."""
        key = ("within", population.workdir)
        if key not in self.cache:
            o = self.options
            self.cache[key] = within_cka(
                population, self.test, "all", o.batch_size, o.passes, seed=o.seed, progress=self.progress
            )
        return self.cache[key]

    def status(self, population: TrainedPopulation) -> LayerStatus:
        """Which block outputs (and stem) of each model are non-finite or constant on the test set
        (what makes a CKA value undefined); from the within-model pass, computed once per run."""
        status = self.within(population).status
        assert status is not None  # within_cka records it
        return status.select(representation_names(population.model, "blocks"))

    def correct(self, population: TrainedPopulation) -> np.ndarray:
        """(M, N) bool: each model right on each test example, from predictions/test.npz checked
        against the data set's classes and the population size; read once per run."""
        key = ("correct", population.workdir)
        if key not in self.cache:
            self.cache[key] = inputs.load_correct(population.workdir, self.test.num_classes, population.size)[0]
        return self.cache[key]

    def widest_block(self, population: TrainedPopulation) -> int:
        """Channels of the widest block output (or stem) of `population`'s architecture."""
        key = ("widest", population.workdir)
        if key not in self.cache:
            self.cache[key] = inputs.widest_block_output(population)
        return self.cache[key]

    def earlier_checkpoint_steps(self, population: TrainedPopulation) -> list[int]:
        """Steps of the checkpoints kept before the one analysed, ascending."""
        return [s for s in inputs.checkpoint_steps(population.workdir) if s < population.step]

    def at_step(self, population: TrainedPopulation, step: int) -> TrainedPopulation:
        """`population` restored from its checkpoint at `step`."""
        return inputs.load_population(population.workdir, step, population.name)

    def train_set(self, population: TrainedPopulation) -> tuple[np.ndarray, np.ndarray]:
        """The full, correctly labelled training split of `population`'s data set: images
        (N, H, W, C) uint8, labels (N,)."""
        return inputs.load_train_set(population.config)

    def class_names(self) -> list[str]:
        """Names of the test set's classes (see `inputs.class_names`)."""
        return inputs.class_names(self.main.config, self.test.num_classes)

    def pooled_blocks(self, population: TrainedPopulation) -> OrderedDict[str, np.ndarray]:
        """Spatially averaged block outputs (and stem) of the first max_models models on the first
        max_examples test examples: name -> (M, n, C), computed once per run."""
        key = ("pooled", population.workdir, population.step)
        if key not in self.cache:
            o = self.options
            self.cache[key] = collect(
                population.subset(slice(0, o.max_models)),
                self.test.in_memory_images()[: o.max_examples],
                self.test,
                "blocks",
                pool=True,
                progress=self.progress,
            )
        return self.cache[key]
