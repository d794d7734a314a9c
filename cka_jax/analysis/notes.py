"""How report sections say what is undefined: notes under figures, table captions, and the reason
each model or model pair is left out of a mean (see `cka_jax.analysis.undefined`).

Undefined values stay NaN in the .npz files, are null with a reason in the .json files, read
"undefined (reason)" in the tables and are hatched or left out of the figures with a note; every
mean over models says which models it left out and why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cka_jax.analysis.plots import UNDEFINED_KEY
from cka_jax.analysis.undefined import LayerStatus


def with_note(text: str, note: str) -> str:
    """`text`, then `note` (what is undefined and why) as its own paragraph when there is one."""
    return f"{text}\n\nUndefined values: {note}." if note else text


def caption(note: str) -> str:
    """A table caption saying which models its means leave out ('' when none)."""
    return f"Undefined values: {note}" if note else ""


def heatmap_note(note: str) -> str:
    """A note for a heatmap figure: undefined cells are hatched."""
    return f"{UNDEFINED_KEY}; {note}" if note else ""


def line_note(note: str) -> str:
    """A note for a line figure: undefined values are left out of it."""
    return f"Undefined values are not drawn; {note}" if note else ""


def joined(*notes: str) -> str:
    """The non-empty `notes`, '; '-separated."""
    return "; ".join(n for n in notes if n)


def status_why(status: LayerStatus, fallback: str) -> Callable[[int], str]:
    """why(model) for `left_out`: the layers that make a model's values undefined."""
    return lambda m: status.why([m]) or fallback


def model_pairs(num_models: int) -> list[tuple[int, int]]:
    """Every unordered pair (i, j) of distinct models, i < j, in row-major order."""
    i, j = np.triu_indices(num_models, 1)
    return list(zip(i.tolist(), j.tolist(), strict=True))


def pair_why(
    status_a: LayerStatus,
    status_b: LayerStatus,
    fallback: str,
    pairs: Sequence[tuple[int, int]],
    label_a: str = "seed",
    label_b: str = "seed",
) -> Callable[[int], str]:
    """why(k) for model pair pairs[k] = (i, j), i of status_a and j of status_b."""

    def why(k: int) -> str:
        i, j = pairs[k]
        parts = [r for r in (status_a.why([i], label_a), status_b.why([j], label_b)) if r]
        return "; ".join(dict.fromkeys(parts)) or fallback

    return why


def pair_name(pairs: Sequence[tuple[int, int]], label_a: str = "seeds", label_b: str = "") -> Callable[[int], str]:
    """name(k) of model pair k: 'seeds 0–1', or 'narrow seed 0 / wide seed 1' with label_b."""
    if label_b:
        return lambda k: f"{label_a} {pairs[k][0]} / {label_b} {pairs[k][1]}"
    return lambda k: f"{label_a} {pairs[k][0]}–{pairs[k][1]}"
