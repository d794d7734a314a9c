"""Analyses of trained populations: the paper's figures and numbers.

Each analysis module is a pure computation on representations or predictions (arrays in, arrays
out) with its plot kept separate; `sections` turns each into files and a report section, and
`runner.run_analyses` runs a chosen set and rebuilds `analysis/report.html` (see analyze.py).

    from cka_jax.analysis import runner
    ctx = runner.load_context("workdir/default")
    runner.run_analyses(ctx, runner.choose_analyses(None, has_compare=False))
"""
from cka_jax.analysis.across import cross_cka
from cka_jax.analysis.blocks import BlockStructure, block_sizes, detect_block
from cka_jax.analysis.cca_measures import cross_seed_same_layer, within_heatmaps
from cka_jax.analysis.context import AnalysisContext, AnalysisOptions
from cka_jax.analysis.deletion import deletion_accuracy
from cka_jax.analysis.disagreement import overall_test, per_class_accuracy, per_class_tests, per_example_accuracy
from cka_jax.analysis.dynamics import similarity_to_final
from cka_jax.analysis.pcs import principal_components
from cka_jax.analysis.probes import probe_accuracy
from cka_jax.analysis.runner import ANALYSES, choose_analyses, load_context, run_analyses
from cka_jax.analysis.unit_matching import matching_curves, sparse_losses
from cka_jax.analysis.within import LayerHeatmaps, within_cka
from cka_jax.analysis.inputs import (AnalysisInputError, Population, TestSet, load_correct, load_population,
                                      load_test_set)

__all__ = [
    "ANALYSES", "AnalysisContext", "AnalysisInputError", "AnalysisOptions", "BlockStructure", "LayerHeatmaps",
    "Population", "TestSet", "block_sizes", "choose_analyses", "cross_cka", "cross_seed_same_layer",
    "deletion_accuracy", "detect_block", "load_context", "load_correct", "load_population", "load_test_set",
    "matching_curves", "overall_test", "per_class_accuracy", "per_class_tests", "per_example_accuracy",
    "principal_components", "probe_accuracy", "run_analyses", "similarity_to_final", "sparse_losses", "within_cka",
    "within_heatmaps",
]
