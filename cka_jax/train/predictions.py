"""predictions/test.npz: every model's logits on the test set, written when training ends."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from cka_jax import _atomic_file as atomic_file
from cka_jax.train.chunked_states import ChunkedStates
from cka_jax.train.device_batches import TrainInputs
from cka_jax.train.health import TrainingDiverged, model_list
from cka_jax.workdir import Workdir


def write_predictions(
    config: ml_collections.ConfigDict, workdir: str, states: ChunkedStates, inputs: TrainInputs, step: int
) -> np.ndarray:
    """Write logits (M, N, C) in ``train.prediction_dtype`` and labels (N,) of the test set;
    returns (M,) test accuracy.

    :class:`~cka_jax.train.health.TrainingDiverged` (found at ``step``; nothing written) if any
    logit is not finite.
    """
    dtype = config.train.prediction_dtype
    logits, labels = states.test_logits(inputs, dtype)
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=(1, 2))).tolist()
    if bad:
        hint = "" if dtype == "float32" else f" (or exceed train.prediction_dtype={dtype}: use float32)"
        raise TrainingDiverged(
            f"the test logits of {model_list(bad)} are not finite{hint}; no predictions were written", bad, step
        )
    if jax.process_index() == 0:
        files = Workdir(workdir)
        os.makedirs(files.predictions_dir, exist_ok=True)
        atomic_file.write(files.predictions, lambda f: np.savez(f, logits=logits, labels=labels))
    return (logits.argmax(-1) == labels[None]).mean(-1)
