"""Every analysis, in report order: the entries that the analysis modules declare beside their
code (see `cka_jax.analysis.entry.Analysis`). Adding an analysis means adding its entry here."""

from __future__ import annotations

from cka_jax.analysis import (
    across,
    blocks,
    cca_measures,
    deletion,
    disagreement,
    dynamics,
    layer_identification,
    pcs,
    probes,
    training_curves,
    unit_matching,
    within,
)
from cka_jax.analysis.entry import Analysis

REPORT_ORDER: tuple[Analysis, ...] = (
    training_curves.ANALYSIS,
    within.ANALYSIS,
    blocks.ANALYSIS,
    pcs.ANALYSIS,
    probes.ANALYSIS,
    deletion.ANALYSIS,
    across.SEEDS,
    cca_measures.CCA,
    unit_matching.MATCHING,
    unit_matching.SPARSE,
    dynamics.ANALYSIS,
    across.ARCHITECTURES,
    disagreement.ANALYSIS,
    cca_measures.CONVERGENCE,
    layer_identification.ANALYSIS,
)

ANALYSES: dict[str, Analysis] = {a.name: a for a in REPORT_ORDER}
