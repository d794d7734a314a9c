"""What every analysis gets: the populations, their test set, options, output paths and caches."""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from cka_jax.analysis.representations import Progress, collect, no_progress
from cka_jax.analysis.within import LayerHeatmaps, within_cka
from cka_jax.analysis.workdir import Population, TestSet


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """Knobs of the analyses (CLI flags map onto these one to one)."""
    batch_size: int = 256            # CKA minibatch size (equal batches of at most this many)
    passes: int = 1                  # passes over the test set for minibatch CKA (paper: 10)
    max_examples: int = 1000         # test examples for PCs, CCA, unit matching, sparse prediction
    max_models: int = 4              # models per population used by pairwise (cross-seed) analyses
    block_threshold: float = 0.85    # pairwise CKA inside a block structure
    block_min_layers: int = 3
    probe_steps: int = 300           # full-batch optimizer steps per linear probe
    probe_examples: int = 5000       # training examples the probes are fitted on
    alpha: float = 0.05              # significance level of the per-class tests
    fdr: bool = False                # Benjamini-Hochberg correction of the per-class tests
    num_bootstrap: int = 1000        # bootstrap resamples for intervals
    level: float = 0.95              # confidence level of intervals
    seed: int = 0


@dataclasses.dataclass
class AnalysisContext:
    """populations[0] is the population analysed; the rest come from --compare."""
    populations: list[Population]
    test: TestSet
    outdir: str
    options: AnalysisOptions = AnalysisOptions()
    progress: Progress = no_progress
    cache: dict[Any, Any] = dataclasses.field(default_factory=dict)

    @property
    def main(self) -> Population:
        return self.populations[0]

    def path(self, name: str) -> str:
        """Absolute path of an output file name inside the analysis directory."""
        return os.path.join(self.outdir, name)

    def within(self, population: Population) -> LayerHeatmaps:
        """All-layer within-model CKA of `population`, computed once per run."""
        key = ("within", population.workdir)
        if key not in self.cache:
            o = self.options
            self.cache[key] = within_cka(population, self.test, "all", o.batch_size, o.passes,
                                         seed=o.seed, progress=self.progress)
        return self.cache[key]

    def pooled_blocks(self, population: Population) -> OrderedDict[str, np.ndarray]:
        """Spatially averaged block outputs (and stem) of the first max_models models on the first
        max_examples test examples: name -> (M, n, C), computed once per run."""
        key = ("pooled", population.workdir, population.step)
        if key not in self.cache:
            o = self.options
            self.cache[key] = collect(population.subset(slice(0, o.max_models)), self.test.images[:o.max_examples],
                                      self.test, "blocks", pool=True, progress=self.progress)
        return self.cache[key]
