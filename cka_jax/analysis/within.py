"""Within-model CKA heatmaps (paper Fig. 1, C.1, D.1): every layer pair of each model.

One forward pass per test minibatch captures every layer of every model (vmapped), and one
`MinibatchCKA` per model (vmapped over the population) accumulates the unbiased minibatch
CKA. Heatmaps over a subset of layers (block outputs, pre/post residual) are sub-matrices
of the all-layer heatmap, since CKA of a layer pair does not depend on the other layers.
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from cka_jax.analysis.plots import heatmap_grid
from cka_jax.analysis.representations import Progress, apply_fn, batch_indices, no_progress
from cka_jax.analysis.workdir import Population, TestSet
from cka_jax.minibatch import MinibatchCKA
from cka_jax.models import CaptureSpec, representation_names
from cka_jax.models.capture import select_names


@dataclasses.dataclass(frozen=True)
class LayerHeatmaps:
    """CKA between layers of each model: cka (M, L, L); low/high (M, L, L) bootstrap interval
    over minibatches (None without bootstrap); layer_names (L,)."""
    cka: np.ndarray
    layer_names: tuple[str, ...]
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def select(self, capture: CaptureSpec) -> "LayerHeatmaps":
        """The heatmaps restricted to the layers matching `capture` (e.g. "blocks")."""
        names = select_names(capture, self.layer_names)
        idx = np.array([self.layer_names.index(n) for n in names])
        sub = lambda a: None if a is None else a[:, idx][:, :, idx]
        return LayerHeatmaps(sub(self.cka), names, sub(self.low), sub(self.high))

    def mean(self) -> np.ndarray:
        """Heatmap averaged over the models (L, L)."""
        return np.nanmean(self.cka, axis=0)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"cka": self.cka, "layer_names": np.array(self.layer_names)}
        if self.low is not None:
            out.update(cka_low=self.low, cka_high=self.high)
        return out


def within_cka(population: Population, test: TestSet, capture: CaptureSpec = "all", batch_size: int = 256,
               passes: int = 1, num_bootstrap: int = 0, level: float = 0.95, seed: int = 0,
               progress: Progress = no_progress) -> LayerHeatmaps:
    """Minibatch CKA between all layers matching `capture`, for every model of `population`.

    Minibatches: equal-size batches of at most `batch_size` test examples, `passes` passes
    (later ones shuffled). num_bootstrap > 0 adds a `level` bootstrap interval over minibatches.
    """
    names = representation_names(population.model, capture)
    forward = apply_fn(population, capture)
    empty = MinibatchCKA.create(len(names), num_bootstrap=num_bootstrap, seed=seed)
    accs = jax.tree.map(lambda a: jnp.broadcast_to(a, (population.size,) + a.shape), empty)

    @jax.jit
    def step(accs, variables, images, mean, std):
        _, reps = forward(variables, images, mean, std)
        return jax.vmap(MinibatchCKA.update)(accs, list(reps.values()))

    for idx in progress(batch_indices(len(test.labels), batch_size, passes, seed), desc="within-model CKA",
                        leave=False):
        accs = step(accs, population.variables, test.images[idx], test.mean, test.std)
    cka = np.asarray(jax.vmap(MinibatchCKA.result)(accs))
    low = high = None
    if num_bootstrap:
        low, high = (np.asarray(a) for a in jax.vmap(lambda a: a.bootstrap_interval(level))(accs))
    return LayerHeatmaps(cka, names, low, high)


def plot_within(heatmaps: LayerHeatmaps, title: str, max_models: int = 7):
    """Seed-averaged heatmap followed by up to `max_models` per-model heatmaps; returns the figure."""
    shown = heatmaps.cka[:max_models]
    matrices = [heatmaps.mean(), *shown]
    titles = [f"mean of {heatmaps.cka.shape[0]} seeds"] + [f"seed {m}" for m in range(len(shown))]
    return heatmap_grid(matrices, titles, heatmaps.layer_names, suptitle=title)


def summary_rows(heatmaps: LayerHeatmaps) -> list[list[str]]:
    """Per model: mean off-diagonal CKA and CKA of the first vs last layer (report table rows)."""
    rows = []
    off = ~np.eye(heatmaps.cka.shape[1], dtype=bool)
    for m, h in enumerate(heatmaps.cka):
        rows.append([f"seed {m}", f"{np.nanmean(h[off]):.3f}", f"{h[0, -1]:.3f}"])
    return rows
