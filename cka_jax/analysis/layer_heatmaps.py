"""Within-model CKA between every pair of layers of each model of a population: the heatmaps
that the within-model analysis (`cka_jax.analysis.within`) reports and that others reuse
(`AnalysisContext.within` computes them once per run).

One forward pass per test minibatch captures every layer of every model (vmapped), and one
`MinibatchCKA` per model (vmapped over the population) accumulates the unbiased minibatch
CKA. Heatmaps over a subset of layers (block outputs, pre/post residual) are sub-matrices
of the all-layer heatmap, since CKA of a layer pair does not depend on the other layers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax import MinibatchCKA
from cka_jax.analysis.representations import ProgressFactory, apply_fn, batch_indices, no_progress
from cka_jax.analysis.undefined import LayerStatus, defined_rows, left_out, mean_of_defined, status_update
from cka_jax.models import CaptureSpec, representation_names
from cka_jax.models.capture import select_names

if TYPE_CHECKING:
    from cka_jax.analysis.inputs import TestSet, TrainedPopulation


@dataclasses.dataclass(frozen=True)
class LayerHeatmaps:
    """CKA between layers of each model: cka (M, L, L); low/high (M, L, L) bootstrap interval
    over minibatches (None without bootstrap); layer_names (L,); status: which layers were
    non-finite or constant (what makes CKA undefined), None when not recorded."""

    cka: np.ndarray
    layer_names: tuple[str, ...]
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    status: LayerStatus | None = None

    def select(self, capture: CaptureSpec) -> LayerHeatmaps:
        """The heatmaps restricted to the layers matching `capture` (e.g. "blocks")."""
        names = select_names(capture, self.layer_names)
        idx = np.array([self.layer_names.index(n) for n in names])

        def sub(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[:, idx][:, :, idx]

        status = None if self.status is None else self.status.select(names)
        return LayerHeatmaps(self.cka[:, idx][:, :, idx], names, sub(self.low), sub(self.high), status)

    def defined_models(self) -> np.ndarray:
        """(M,) bool: models whose whole heatmap is defined (finite)."""
        return defined_rows(self.cka)

    def mean(self) -> np.ndarray:
        """Heatmap (L, L) averaged over the models whose whole heatmap is defined (all NaN if none:
        see `defined_models`, `why`)."""
        return mean_of_defined(self.cka)[0]

    def why(self, model: int) -> str:
        """Why the heatmap of `model` has undefined cells ('' if it has none)."""
        if np.isfinite(self.cka[model]).all():
            return ""
        reason = self.status.why([model]) if self.status is not None else ""
        return reason or "the CKA estimate is not finite"

    def mean_note(self) -> str:
        """'' when every model is defined, else which models the mean leaves out and why."""
        return left_out(self.defined_models(), self.why)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"cka": self.cka, "layer_names": np.array(self.layer_names)}
        if self.low is not None and self.high is not None:
            out.update(cka_low=self.low, cka_high=self.high)
        if self.status is not None:
            out.update(layer_finite=self.status.finite, layer_varying=self.status.varying)
        return out


def within_cka(
    population: TrainedPopulation,
    test: TestSet,
    capture: CaptureSpec = "all",
    batch_size: int = 256,
    passes: int = 1,
    num_bootstrap: int = 0,
    level: float = 0.95,
    seed: int = 0,
    progress: ProgressFactory = no_progress,
) -> LayerHeatmaps:
    """Minibatch CKA between all layers matching `capture`, for every model of `population`.

    Minibatches: equal-size batches of at most `batch_size` test examples, `passes` passes
    (later ones shuffled). num_bootstrap > 0 adds a `level` bootstrap interval over minibatches.
    """
    names = representation_names(population.model, capture)
    forward = apply_fn(population, capture)
    empty = MinibatchCKA.create(len(names), num_bootstrap=num_bootstrap, seed=seed)
    accs = jax.tree.map(lambda a: jnp.broadcast_to(a, (population.size,) + a.shape), empty)

    @jax.jit
    def step(accs, finite, varying, variables, images, mean, std):
        _, reps = forward(variables, images, mean, std)
        reps = list(reps.values())
        return (jax.vmap(MinibatchCKA.update)(accs, reps),) + status_update(finite, varying, reps)

    finite = varying = jnp.ones((population.size, len(names)), bool)
    for idx in progress(
        batch_indices(len(test.labels), batch_size, passes, seed), desc="within-model CKA", leave=False
    ):
        accs, finite, varying = step(
            accs, finite, varying, population.variables, test.in_memory_images()[idx], test.mean, test.std
        )
    cka = np.asarray(jax.vmap(MinibatchCKA.result)(accs))
    low = high = None
    if num_bootstrap:
        low, high = (np.asarray(a) for a in jax.vmap(lambda a: a.bootstrap_interval(level))(accs))
    return LayerHeatmaps(cka, names, low, high, LayerStatus(np.asarray(finite), np.asarray(varying), names))
