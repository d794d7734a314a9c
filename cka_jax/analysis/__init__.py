"""Analyses of trained populations: the paper's figures and numbers.

Each analysis module holds one analysis (two for across, cca_measures and unit_matching): a pure
computation on representations or predictions (arrays in, arrays out), its figure, its report
section (`section(ctx) -> Section`, which writes the numbers and figures) and its registry entry
(`cka_jax.analysis.entry.Analysis`). `registry` lists the entries in report order and
`runner.run_analyses` runs a chosen set and rebuilds `analysis/report.html` (see analyze.py).

    from cka_jax.analysis import runner
    ctx = runner.load_context("workdir/default")
    runner.run_analyses(ctx, runner.choose_analyses(None, has_compare=False))

The names below load their module on first use, so that `from cka_jax.analysis.blocks import
detect_block` loads neither the training stack (orbax, optax, tensorflow_datasets, grain) nor
seaborn.
"""

from __future__ import annotations

import importlib

_EXPORTS = {  # public name -> the module of cka_jax.analysis that defines it
    "ANALYSES": "registry",
    "AnalysisContext": "context",
    "AnalysisInputError": "errors",
    "AnalysisOptions": "context",
    "BlockStructure": "blocks",
    "LayerHeatmaps": "layer_heatmaps",
    "TestSet": "inputs",
    "TrainedPopulation": "inputs",
    "block_sizes": "blocks",
    "choose_analyses": "runner",
    "cross_cka": "across",
    "cross_seed_same_layer": "cca_measures",
    "deletion_accuracy": "deletion",
    "detect_block": "blocks",
    "load_context": "runner",
    "load_correct": "inputs",
    "load_population": "inputs",
    "load_test_set": "inputs",
    "matching_curves": "unit_matching",
    "overall_test": "disagreement",
    "per_class_accuracy": "disagreement",
    "per_class_tests": "disagreement",
    "per_example_accuracy": "disagreement",
    "principal_components": "pcs",
    "probe_accuracy": "probes",
    "run_analyses": "runner",
    "similarity_to_final": "dynamics",
    "sparse_losses": "unit_matching",
    "within_cka": "layer_heatmaps",
    "within_heatmaps": "cca_measures",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Imports the module defining `name` on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
