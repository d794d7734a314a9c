"""What the run reports after each epoch: metrics.jsonl rows, a log line, the progress bar.

metrics.jsonl has one row per model and epoch (:mod:`cka_jax.workdir.metrics_log`): epoch, step,
model, train loss and accuracy (this epoch's so far), learning rate, images per second per model,
test accuracy when evaluated, and ``"diverged": true`` for a model that diverged there.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from cka_jax.train import step as training
from cka_jax.train.health import Health
from cka_jax.workdir import Workdir, metrics_log

logger = logging.getLogger(__name__)


class ProgressBar(Protocol):
    """What the loop reports to once per epoch (a ``tqdm`` bar over epochs fits)."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...


class EpochSpeed:
    """Images per second over an epoch, from its start (or the resume inside it) to its end."""

    def __init__(self, images_per_step: int, step: int):
        self.images_per_step = images_per_step
        self.restart(step)

    def restart(self, step: int) -> None:
        self._start, self._start_step = time.perf_counter(), step

    def images_per_second(self, step: int) -> float:
        """Over steps ``[start, step)``; call once their results are ready (block on them)."""
        seconds = max(time.perf_counter() - self._start, 1e-9)
        return self.images_per_step * (step - self._start_step) / seconds


class EpochLog:
    """Writes a run's per-epoch reports into ``workdir`` (process 0) and ``progress``."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        num_models: int,
        steps_per_epoch: int,
        progress: ProgressBar | None,
    ):
        self.config, self.num_models, self.steps_per_epoch = config, num_models, steps_per_epoch
        self._path = Workdir(workdir).metrics
        self._learning_rate = training.learning_rate_schedule(config, steps_per_epoch)
        self._progress = progress

    def resumed_at(self, step: int) -> None:
        """Advance the bar over the epochs done before ``step``."""
        if self._progress is not None:
            self._progress.update(step // self.steps_per_epoch)

    def epoch_done(self, step: int, health: Health, images_per_s: float, test_accuracy: np.ndarray | None) -> None:
        """Train metrics (and ``test_accuracy`` (M,), when evaluated) of every model at the end
        of an epoch: metrics.jsonl, log, bar."""
        epoch = step // self.steps_per_epoch
        self.append_rows(step, epoch, health, images_per_s, test_accuracy)
        summary = f"{images_per_s:.0f} img/s"
        if test_accuracy is not None:
            summary += f", test acc {test_accuracy.mean():.4f} ± {test_accuracy.std():.4f}"
        sums = health.sums
        logger.debug(
            "epoch %d/%d (step %d): train loss %.4f, %s",
            epoch,
            self.config.train.epochs,
            step,
            float(np.mean(sums[:, 0] / sums[:, 2])),
            summary,
        )
        if self._progress is not None:
            self._progress.set_postfix_str(summary, refresh=False)
            self._progress.update(1)

    def diverged_inside_epoch(self, step: int, health: Health) -> None:
        """The rows of a divergence found at a checkpoint inside an epoch (so that the workdir
        records it too)."""
        self.append_rows(step, -(-step // self.steps_per_epoch), health, math.nan, None)

    def append_rows(
        self, step: int, epoch: int, health: Health, images_per_s: float, test_accuracy: np.ndarray | None
    ) -> None:
        """One metrics.jsonl row per model for ``epoch`` (its train sums so far), diverged models
        marked ``"diverged": true``."""
        if jax.process_index() != 0:
            return
        sums, diverged = health.sums, set(health.diverged)
        learning_rate = float(self._learning_rate(step - 1))
        rows = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for m in range(self.num_models):
                row = {
                    "epoch": epoch,
                    "step": step,
                    "model": m,
                    "train_loss": float(sums[m, 0] / sums[m, 2]),
                    # a non-finite loss comes from non-finite logits, whose argmax says nothing
                    "train_accuracy": (float(sums[m, 1] / sums[m, 2]) if np.isfinite(sums[m, 0]) else None),
                    "learning_rate": learning_rate,
                    "images_per_second": images_per_s / self.num_models,
                }
                if test_accuracy is not None:
                    row["test_accuracy"] = float(test_accuracy[m])
                if m in diverged:
                    row["diverged"] = True
                rows.append(row)
        metrics_log.append(self._path, rows)
