"""The result of `compare`: the heatmap with its layer names, counts and options; save and load.

Files are .npz (no pickle): the arrays, the layer names, the options as JSON, a format tag and a
SHA-256 digest over everything else. `load_comparison` checks all of them, so a damaged, truncated or
foreign file is a one-line ValueError, never a plausible heatmap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from cka_jax import _atomic_file as atomic_file
from cka_jax._compare.result_checks import check_comparison

FORMAT = "cka_jax.compare/1"
_META = (
    "name_a",
    "name_b",
    "kernel",
    "threshold",
    "debiased",
    "level",
    "num_bootstrap",
    "population",
    "all_pairs",
    "num_permutations",
)
_OPTIONAL_META = {"num_permutations": 0}  # fields files written before them lack


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class CKAComparison:
    """CKA between every selected layer of model a (rows) and of model b (columns); `compare` makes one.

    Attributes:
        heatmap: (La, Lb); (M, La, Lb) for populations (model i of a against model i of b, or
            against itself); (Ma, Mb, La, Lb) with all_pairs. NaN where CKA is undefined (a layer
            constant on every minibatch) or the activations held NaN/inf.
        layers_a: the La layer names of model a, network order.
        layers_b: the Lb layer names of model b.
        num_examples: the examples fed to each model.
        num_minibatches: the minibatches they came in.
        interval: bootstrap (low, high), each like heatmap, when num_bootstrap > 0; else None.
        p_values: permutation p-values like heatmap (NaN where undefined), when
            num_permutations > 0; else None.
        name_a: label of model a.
        name_b: label of model b.
        kernel: "linear" or "rbf".
        threshold: the RBF bandwidth multiple.
        debiased: minibatch CKA (True) or whole-set CKA (False).
        level: the interval's confidence level, or None.
        num_bootstrap: the bootstrap replicates behind the interval.
        num_permutations: the permutation replicates behind p_values.
        population: one heatmap per model.
        all_pairs: every model pair.

    Raises:
        ValueError: on construction, contents no comparison can have (a heatmap that does not fit
            the layer names, an interval of another shape, fields of the wrong type).
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
    p_values: np.ndarray | None = None
    num_permutations: int = 0

    def __post_init__(self):
        """ValueError (one line, naming the argument) for contents no comparison can have: they
        would be shown as a plausible result, or make repr and plot fail."""
        check_comparison(self)

    @property
    def estimator(self) -> str:
        """The estimator in words, e.g. 'minibatch CKA (HSIC₁, debiased)'."""
        return "minibatch CKA (HSIC₁, debiased)" if self.debiased else "whole-set CKA (HSIC₀, biased)"

    def value(self, layer_a: str, layer_b: str):
        """CKA of one layer pair by name.

        Args:
            layer_a: a name in `layers_a`.
            layer_b: a name in `layers_b`.

        Returns:
            A float, or an array over models for populations.

        Raises:
            ValueError: a name that is not a layer (the message lists the layers).
        """
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
        alpha: float | None = None,
    ):
        """The heatmap in the paper's style (first layer bottom left).

        Args:
            index: for populations, the panel to draw (i, or (i, j) with all_pairs); None draws one
                panel per model.
            ax: draw a single heatmap into this existing matplotlib Axes.
            title: the title (default: the two model names).
            cmap: a matplotlib colormap name.
            max_labels: at most this many tick labels per axis.
            annotate: write the values in the cells (default: when both sides have at most 12 layers).
            alpha: mark entries whose permutation p-value exceeds it (not significant at that
                level; needs num_permutations > 0).

        Returns:
            The matplotlib Figure.

        Raises:
            ValueError: an index out of range or not allowed for this comparison.
        """
        from cka_jax._compare.plot import plot_comparison

        return plot_comparison(
            self, index=index, ax=ax, title=title, cmap=cmap, max_labels=max_labels, annotate=annotate, alpha=alpha
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
        if self.p_values is not None:
            parts.append(f"permutation p-values ({self.num_permutations} replicates)")
        if undefined:
            parts.append(f"{undefined} undefined (NaN) entries")
        return (
            f"CKAComparison({'; '.join(parts)}\n  layers_a: {_short(self.layers_a)}\n"
            f"  layers_b: {_short(self.layers_b)})"
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> CKAComparison:
        """A comparison written by `save`; the same as `cka_jax.load_comparison(path)`.

        Args:
            path: the .npz file.

        Returns:
            The `CKAComparison`.

        Raises:
            FileNotFoundError: no file at path.
            ValueError: the file is not a comparison, is damaged, or does not match its digest.
        """
        return load_comparison(path)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the comparison to `path` (.npz, no pickle, written atomically).

        The file holds the arrays, the layer names, the options as JSON, a format tag and a SHA-256
        digest over everything else; `load_comparison` reads it back and checks all of them.

        Args:
            path: where to write.
        """
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
    if result.p_values is not None:
        arrays["p_values"] = np.asarray(result.p_values, np.float64)
    return arrays


def _digest(arrays: dict[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    for key in sorted(arrays):
        if key != "digest":
            a = np.ascontiguousarray(arrays[key])
            sha.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
            sha.update(a.tobytes())
    return sha.hexdigest()


def load_comparison(path: str | os.PathLike) -> CKAComparison:
    """A comparison written by `CKAComparison.save`.

    The same as `CKAComparison.load(path)`. A damaged, truncated or foreign file is a one-line
    ValueError, never a plausible heatmap.

    Args:
        path: the .npz file.

    Returns:
        The `CKAComparison`, equal to the one saved.

    Raises:
        FileNotFoundError: no file at path.
        ValueError: the file is not a readable comparison file, has no format tag, or does not
            match the digest written with it.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> import cka_jax
        >>> stream = [{"a": x, "b": x ** 2} for x in np.split(np.random.default_rng(0).normal(size=(32, 3)), 2)]
        >>> result = cka_jax.compare(None, batches=stream, progress=False)
        >>> path = os.path.join(tempfile.mkdtemp(), "cka.npz")
        >>> result.save(path)
        >>> np.array_equal(cka_jax.load_comparison(path).heatmap, result.heatmap)
        True
    """
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
    # The digest only says the file is as written, not what wrote it: check what save writes.
    try:
        return _from_arrays(arrays)
    except (KeyError, TypeError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{path} is not a valid CKA comparison file: {reason}") from None


_REQUIRED = ("format", "digest", "heatmap", "layers_a", "layers_b", "counts", "meta")
_INTERVAL = ("interval_low", "interval_high")


def _from_arrays(arrays: dict[str, np.ndarray]) -> CKAComparison:
    """The comparison that `_arrays` wrote as `arrays`; ValueError naming the first array or field
    that `save` cannot have written (a wrong dtype or shape, a field of the wrong type)."""
    missing = [key for key in _REQUIRED if key not in arrays]
    unknown = sorted(set(arrays) - {*_REQUIRED, *_INTERVAL, "p_values"})
    if missing or unknown:
        raise ValueError(f"missing arrays {missing}" if missing else f"unexpected arrays {unknown}")
    if ("interval_low" in arrays) != ("interval_high" in arrays):
        raise ValueError("an interval needs both interval_low and interval_high")
    for key in ("format", "digest", "meta"):
        if arrays[key].dtype.kind != "U" or arrays[key].ndim != 0:
            raise ValueError(f"{key} must be one string, got {arrays[key].dtype} of shape {arrays[key].shape}")
    for key in ("heatmap", *_INTERVAL, "p_values"):
        if key in arrays and arrays[key].dtype.kind != "f":
            raise ValueError(f"{key} must hold real floats (CKA values), got dtype {arrays[key].dtype}")
    for key in ("layers_a", "layers_b"):
        if arrays[key].dtype.kind != "U" or arrays[key].ndim != 1:
            raise ValueError(
                f"{key} must be a list of names, got dtype {arrays[key].dtype} and shape {arrays[key].shape}"
            )
    counts = arrays["counts"]
    if counts.dtype.kind not in "iu" or counts.shape != (2,):
        raise ValueError(
            f"counts must be 2 integers (num_examples, num_minibatches), got {counts.dtype} of shape {counts.shape}"
        )
    meta = json.loads(str(arrays["meta"]))
    if isinstance(meta, dict):
        meta = {**_OPTIONAL_META, **meta}
    if not isinstance(meta, dict) or set(meta) != set(_META):
        fields = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"meta must hold the fields {sorted(_META)}, got {fields}")
    for key in ("threshold", "level", "num_bootstrap", "num_permutations"):  # JSON true/false would pass as 1/0
        if isinstance(meta[key], bool):
            raise ValueError(f"meta field {key} must be a number, got {meta[key]!r}")
    interval = (arrays["interval_low"], arrays["interval_high"]) if "interval_low" in arrays else None
    result = CKAComparison(
        heatmap=arrays["heatmap"],
        layers_a=tuple(str(s) for s in arrays["layers_a"]),
        layers_b=tuple(str(s) for s in arrays["layers_b"]),
        num_examples=int(counts[0]),
        num_minibatches=int(counts[1]),
        interval=interval,
        p_values=arrays.get("p_values"),
        **{key: meta[key] for key in _META},
    )
    if interval is not None and (interval[0] > interval[1]).any():  # NaN compares False
        raise ValueError("the interval's low bound lies above its high bound")
    return result
