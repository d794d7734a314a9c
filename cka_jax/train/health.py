"""Divergence: which models reached a non-finite state or an exploded loss, and the error that
stops such a run.

A run that diverges stops with :class:`TrainingDiverged`; it saves no checkpoint of the diverged
state and no predictions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax.train import population as pop
from cka_jax.train import step as training
from cka_jax.train.chunked_states import ChunkedStates

# An epoch's mean train cross-entropy above EXPLODED_LOSS_FACTOR * ln(C) (C classes) counts as a
# divergence. Predicting uniformly scores ln(C), an initialised network about that; a mean of
# 100 ln(C) means the true class gets on average a probability below C^-100, which a run that is
# learning never passes through. Measured on digits (ResNet-8, 2 models, 4 epochs): learning rates
# 0.1 to 10 peak at 5.6 (2.4 ln 10); 30 peaks at 115 (50 ln 10) and learns nothing; 100 and above
# reach 1e5 to 1e15 (1e4: 1.7e15 in epoch 1).
EXPLODED_LOSS_FACTOR = 100.0


class TrainingDiverged(RuntimeError):
    """Training stopped because models diverged; nothing of the diverged state was saved.

    Attributes: ``models`` (indices of the diverged models), ``step`` (the step it was found at).
    """

    def __init__(self, message: str, models: Sequence[int], step: int):
        super().__init__(message)
        self.models, self.step = list(models), step


@dataclasses.dataclass(frozen=True)
class Health:
    """The population's divergence check at one step."""

    sums: np.ndarray  # (M, 3) this epoch's summed train loss, correct, count
    non_finite: list[int]  # models with a non-finite value anywhere in their state
    exploded: list[int]  # finite models whose mean train loss is above max_loss
    max_loss: float

    @property
    def diverged(self) -> list[int]:
        return sorted(self.non_finite + self.exploded)


def health_values(state: training.TrainState) -> jax.Array:
    """(4,): one model's epoch sums (train loss, correct, count), then 1 if every float in its
    state is finite, else 0."""
    return jnp.append(state.epoch_sums, training.state_is_finite(state).astype(jnp.float32))


class HealthCheck:
    """Checks which models of ``states`` diverged: per chunk, one reduction of its state on
    device (:func:`health_values`) and one transfer of its values to host."""

    def __init__(self, states: ChunkedStates, num_classes: int):
        self._states = states
        self._values = pop.map_models(health_values, states.layout)
        self.max_loss = EXPLODED_LOSS_FACTOR * math.log(num_classes)

    def __call__(self) -> Health:
        values = self._states.per_model(self._values)
        sums, finite = values[:, :3], values[:, 3] == 1
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_loss = sums[:, 0] / sums[:, 2]
        exploded = finite & (sums[:, 2] > 0) & (mean_loss > self.max_loss)
        return Health(sums, np.flatnonzero(~finite).tolist(), np.flatnonzero(exploded).tolist(), self.max_loss)


def model_list(indices: Sequence[int], shown: int = 20) -> str:
    """e.g. 'models 0, 3' ('model 0' for one; the first ``shown`` and a count for many)."""
    more = f", ... ({len(indices)} in all)" if len(indices) > shown else ""
    return f"model{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices[:shown]))}{more}"


def divergence(health: Health, step: int, epoch: int, epochs: int, kept_steps: Sequence[int]) -> TrainingDiverged:
    """The error that stops a run that diverged at ``step`` (in ``epoch`` of ``epochs``), given the
    checkpoint steps kept on disk."""
    parts = []
    if health.non_finite:
        parts.append(
            f"{model_list(health.non_finite)} reached non-finite values (in the loss, "
            "parameters, BatchNorm statistics or optimizer state)"
        )
    if health.exploded:
        worst = max(health.sums[m, 0] / health.sums[m, 2] for m in health.exploded)
        parts.append(
            f"{model_list(health.exploded)} reached a mean train loss of {worst:.3g} "
            f"(above {health.max_loss:.0f} = {EXPLODED_LOSS_FACTOR:g} ln(classes): exploded)"
        )
    last = f"the last finite checkpoint (step {kept_steps[-1]}) is kept" if kept_steps else "no checkpoint is kept"
    return TrainingDiverged(
        f"training diverged at step {step} (epoch {epoch} of {epochs}): "
        + "; ".join(parts)
        + f". Nothing of it was saved: {last} and no predictions were written. "
        "Lower train.learning_rate (or add train.warmup_epochs) and train into a new --workdir.",
        health.diverged,
        step,
    )
