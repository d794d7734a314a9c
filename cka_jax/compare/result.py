"""The result of `compare`: the heatmap with its layer names, counts and options; save and load.

Files are .npz (no pickle): the arrays, the layer names, the options as JSON, a format tag and a
SHA-256 digest over everything else. `load` checks all of them, so a damaged, truncated or
foreign file is a one-line ValueError, never a plausible heatmap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from cka_jax import atomic_file

FORMAT = "cka_jax.compare/1"
_META = ("name_a", "name_b", "kernel", "threshold", "debiased", "level", "num_bootstrap", "population", "all_pairs")


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class CKAComparison:
    """CKA between every selected layer of model a (rows) and of model b (columns).

    heatmap: (La, Lb); (M, La, Lb) for populations (model i of a against model i of b, or against
    itself); (Ma, Mb, La, Lb) with all_pairs. NaN where CKA is undefined (a layer constant on
    every minibatch) or the activations held NaN/inf. interval: bootstrap (low, high), each like
    heatmap, when num_bootstrap > 0. num_examples counts the examples fed to each model.
    """

    heatmap: np.ndarray
    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    num_examples: int
    num_minibatches: int
    interval: tuple[np.ndarray, np.ndarray] | None = None
    name_a: str = "model_a"
    name_b: str = "model_b"
    kernel: str = "linear"
    threshold: float = 1.0
    debiased: bool = True
    level: float | None = None
    num_bootstrap: int = 0
    population: bool = False
    all_pairs: bool = False

    def __post_init__(self):
        lead = (2 if self.all_pairs else 1) if self.population else 0
        shape = np.shape(self.heatmap)
        if len(shape) != lead + 2 or shape[lead:] != (len(self.layers_a), len(self.layers_b)):
            raise ValueError(
                f"heatmap of shape {shape} does not fit {len(self.layers_a)} x {len(self.layers_b)} layers "
                f"(population={self.population}, all_pairs={self.all_pairs})"
            )
        if self.interval is not None and any(np.shape(b) != shape for b in self.interval):
            raise ValueError(f"interval bounds must have the heatmap's shape {shape}")

    @property
    def estimator(self) -> str:
        return "minibatch CKA (HSIC₁, debiased)" if self.debiased else "whole-set CKA (HSIC₀, biased)"

    def value(self, layer_a: str, layer_b: str):
        """CKA of one layer pair by name: a float, or an array over models for populations."""
        for name, names in ((layer_a, self.layers_a), (layer_b, self.layers_b)):
            if name not in names:
                raise ValueError(f"no layer {name!r}; the layers are {list(names)}")
        out = self.heatmap[..., self.layers_a.index(layer_a), self.layers_b.index(layer_b)]
        return float(out) if np.ndim(out) == 0 else out

    def plot(
        self,
        index=None,
        *,
        ax=None,
        title: str | None = None,
        cmap: str = "magma",
        max_labels: int = 40,
        annotate: bool | None = None,
    ):
        """The heatmap in the paper's style (first layer bottom left); returns the matplotlib Figure.

        Populations: one panel per model (index=i for one; all_pairs: index=(i, j)). ax: draw a
        single heatmap into an existing Axes. annotate: write the values in the cells (default:
        when both sides have at most 12 layers).
        """
        from cka_jax.compare.plot import plot_comparison

        return plot_comparison(
            self, index=index, ax=ax, title=title, cmap=cmap, max_labels=max_labels, annotate=annotate
        )

    def __repr__(self) -> str:
        heat = np.asarray(self.heatmap)
        undefined = int(np.sum(~np.isfinite(heat)))
        parts = [
            f"{self.name_a} vs {self.name_b}",
            f"heatmap {heat.shape}",
            f"{self.num_examples} examples in {self.num_minibatches} minibatches",
            f"{self.kernel} kernel" + (f" (threshold {self.threshold:g})" if self.kernel == "rbf" else ""),
            self.estimator,
        ]
        if self.interval is not None:
            parts.append(f"{self.level:.0%} bootstrap interval ({self.num_bootstrap} replicates)")
        if undefined:
            parts.append(f"{undefined} undefined (NaN) entries")
        return (
            f"CKAComparison({'; '.join(parts)}\n  layers_a: {_short(self.layers_a)}\n"
            f"  layers_b: {_short(self.layers_b)})"
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the comparison to `path` (.npz, written atomically; `load` reads it back)."""
        arrays = _arrays(self)
        arrays["digest"] = np.array(_digest(arrays))
        atomic_file.write(os.fspath(path), lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def _short(names: tuple[str, ...], limit: int = 8) -> str:
    shown = list(names) if len(names) <= limit else list(names[: limit // 2]) + ["..."] + list(names[-limit // 2 :])
    return f"{', '.join(shown)} ({len(names)} layers)"


def _arrays(result: CKAComparison) -> dict[str, np.ndarray]:
    meta = {key: getattr(result, key) for key in _META}
    arrays = {
        "format": np.array(FORMAT),
        "heatmap": np.asarray(result.heatmap, np.float64),
        "layers_a": np.array(result.layers_a, dtype=str),
        "layers_b": np.array(result.layers_b, dtype=str),
        "counts": np.array([result.num_examples, result.num_minibatches], np.int64),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }
    if result.interval is not None:
        arrays["interval_low"] = np.asarray(result.interval[0], np.float64)
        arrays["interval_high"] = np.asarray(result.interval[1], np.float64)
    return arrays


def _digest(arrays: dict[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    for key in sorted(arrays):
        if key != "digest":
            a = np.ascontiguousarray(arrays[key])
            sha.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
            sha.update(a.tobytes())
    return sha.hexdigest()


def load(path: str | os.PathLike) -> CKAComparison:
    """A comparison written by `CKAComparison.save`; ValueError (one line) for any other file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except Exception as error:  # noqa: BLE001 - zip, zlib, pickle and format errors all mean "not our file"
        raise ValueError(f"{path} is not a readable CKA comparison file ({type(error).__name__}: {error})") from None
    if "format" not in arrays or str(arrays["format"]) != FORMAT:
        raise ValueError(f"{path} is not a CKA comparison file (no '{FORMAT}' format tag)")
    if "digest" not in arrays or str(arrays["digest"]) != _digest(arrays):
        raise ValueError(f"{path} is damaged: its contents do not match the digest written with them")
    try:
        meta = json.loads(str(arrays["meta"]))
        interval = (arrays["interval_low"], arrays["interval_high"]) if "interval_low" in arrays else None
        num_examples, num_minibatches = (int(c) for c in arrays["counts"])
        return CKAComparison(
            heatmap=arrays["heatmap"],
            layers_a=tuple(str(s) for s in arrays["layers_a"]),
            layers_b=tuple(str(s) for s in arrays["layers_b"]),
            num_examples=num_examples,
            num_minibatches=num_minibatches,
            interval=interval,
            **{key: meta[key] for key in _META},
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a valid CKA comparison file ({type(error).__name__}: {error})") from None
