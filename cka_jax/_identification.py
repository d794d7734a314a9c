"""Layer identification (Kornblith et al. 2019, Table 2): does a similarity measure find, in another
network of the same architecture, the layer that corresponds to a given layer?"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

UNDEFINED = ("nan", "wrong")


class LayerIdentification(NamedTuple):
    """The outcome of `layer_identification` over M models with L layers each.

    Attributes:
        accuracy: float in [0, 1], the fraction of trials identified correctly (NaN with
            undefined="nan" when any trial is undefined).
        correct: (M, M, L) float: 1.0 where layer i of model a finds layer i of model b as its
            unique most similar layer, 0.0 where not, NaN where the trial is undefined and on the
            diagonal a == b.
        num_trials: M·(M - 1)·L, the ordered model pairs times the layers.
        num_undefined: trials whose row of similarities holds a NaN or inf.
    """

    accuracy: float
    correct: np.ndarray
    num_trials: int
    num_undefined: int


def layer_identification(similarity: Any, undefined: str = "nan") -> LayerIdentification:
    """Scores how well a similarity measure identifies corresponding layers across models.

    For every ordered pair of different models (a, b) and every layer i of a, the trial is correct
    iff argmax_j S[a, b, i, j] is i and unique: S[a, b, i, i] > S[a, b, i, j] for every j != i
    (ties count as wrong). Any measure works where larger means more similar (CKA, CCA, ...);
    for an asymmetric one, pass S + Sᵀ (over models and layers) as the paper does.

    Args:
        similarity: (M, M, L, L) real array, S[a, b, i, j] the similarity of layer i of model a to
            layer j of model b, M >= 2, L >= 2. Entries with a == b are not read.
        undefined: what a trial whose row S[a, b, i, :] holds a NaN or inf (an undefined
            similarity) does: "nan" (default) makes the accuracy NaN, "wrong" counts the trial
            as not identified. Either way it is counted in num_undefined, never as correct.

    Returns:
        LayerIdentification: accuracy, the per-trial outcomes correct: (M, M, L), num_trials
        and num_undefined.

    Raises:
        ValueError: similarity is not a real (M, M, L, L) array with M, L >= 2, or undefined is
            not "nan" or "wrong".
    """
    if undefined not in UNDEFINED:
        raise ValueError(f"undefined must be one of {UNDEFINED}, got {undefined!r}")
    s = np.asarray(similarity)
    if s.dtype.kind not in "fiu":
        raise ValueError(f"similarity must hold real numbers, got dtype {s.dtype}")
    if s.ndim != 4 or s.shape[0] != s.shape[1] or s.shape[2] != s.shape[3]:
        raise ValueError(f"similarity must have shape (M, M, L, L) (models, models, layers, layers), got {s.shape}")
    m, _, num_layers, _ = s.shape
    if m < 2 or num_layers < 2:
        raise ValueError(f"similarity needs at least 2 models and 2 layers, got shape {s.shape}")
    s = s.astype(np.float64)
    layers = np.arange(num_layers)
    diagonal = s[:, :, layers, layers]  # (M, M, L): S[a, b, i, i]
    others = np.where(np.eye(num_layers, dtype=bool), -np.inf, s)  # S[a, b, i, j], j != i
    with np.errstate(invalid="ignore"):
        correct = (diagonal > others.max(axis=-1)).astype(np.float64)
    bad = ~np.isfinite(s).all(axis=-1)
    pairs = ~np.eye(m, dtype=bool)[:, :, None] & np.ones(num_layers, bool)
    correct = np.where(bad, np.nan, correct)
    correct[~pairs] = np.nan
    num_undefined = int((bad & pairs).sum())
    num_trials = m * (m - 1) * num_layers
    if num_undefined and undefined == "nan":
        accuracy = float("nan")
    else:
        accuracy = float(np.nansum(correct[pairs]) / num_trials)
    return LayerIdentification(accuracy, correct, num_trials, num_undefined)
