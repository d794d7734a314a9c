"""Input checks shared by every measure, run on the host before any compiled code.

Conventions: a representation is `x: (n, ...)`, n examples by any feature shape; trailing dims are
flattened to `(n, p)`. Inputs must be arrays (NumPy or JAX; Python lists are refused, as JAX does)
of real numbers: bool, integer and 16-bit float inputs are upcast to float32, float64 stays float64
with `jax_enable_x64`; complex, string and object arrays raise `ValueError`. Every check reads only
shapes and dtypes, so it runs on the host for concrete arrays and for tracers alike (inside a
user's jit or vmap); each failure is one `ValueError` line naming the argument.

The compiled side of the same conventions is here too: `to_float` and `float_matrix` turn a
checked input into the float array the measures compute in, and `nan_unless` keeps NaN or inf
inputs from turning into plausible values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array | np.ndarray
Activations = Sequence[Any] | Mapping[str, Any]


class Shaped(Protocol):
    """Anything with a shape: an array, a tracer, or a jax.ShapeDtypeStruct stand-in."""

    @property
    def shape(self) -> tuple[int, ...]: ...


def float_dtype(dtype: Any, name: str = "x") -> np.dtype:
    """The float dtype a real `dtype` is computed in; ValueError naming `name` for any other dtype.

    bool, integers and floats narrower than 32 bits -> float32; float64 -> float64 when
    `jax_enable_x64` is on (float32 otherwise); float32 stays.
    """
    dtype = np.dtype(dtype)
    real = dtype.kind in "biu" or (dtype.kind in "fV" and jnp.issubdtype(dtype, jnp.floating))
    if not real:
        raise ValueError(f"{name} must hold real numbers (bool, integer or float), got dtype {dtype}")
    wide = dtype.kind == "f" and dtype.itemsize >= 8
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64 if wide else jnp.float32))


def check_input(x: Any, name: str = "x", min_ndim: int = 2) -> Array:
    """x as a NumPy or JAX array (other array-likes converted to NumPy; dtype unchanged).

    ValueError naming `name` unless x is an array (not a Python list or tuple) of real numbers
    with at least `min_ndim` dims and no zero-length axis.
    """
    if isinstance(x, (list, tuple)):
        raise ValueError(
            f"{name} must be an array (NumPy or JAX), got a Python {type(x).__name__}; convert it with np.asarray"
        )
    if not isinstance(x, (jax.Array, np.ndarray)):
        x = np.asarray(x)
    float_dtype(x.dtype, name)
    shape = tuple(x.shape)
    if len(shape) < min_ndim:
        expected = "(n, ...) with at least one feature axis" if min_ndim == 2 else f"at least {min_ndim} dims"
        raise ValueError(f"{name} must have shape {expected}, got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} has shape {shape}: every axis needs at least one entry (examples and features)")
    return x


def check_pair(x: Any, y: Any) -> tuple[Array, Array]:
    """Checked x: (n, ...), y: (n, ...) (see `check_input`); ValueError unless both have the same n."""
    xc, yc = check_input(x, "x"), check_input(y, "y")
    if xc.shape[0] != yc.shape[0]:
        raise ValueError(
            f"x and y must be (n, ...) arrays with the same number n of examples; got {np.shape(x)} and {np.shape(y)}"
        )
    return xc, yc


def check_gram(gram: Any, name: str = "gram") -> Array:
    """A checked square (..., n, n) gram; ValueError naming `name` otherwise."""
    gram = check_input(gram, name)
    if gram.shape[-2] != gram.shape[-1]:
        raise ValueError(f"{name} must be square, (..., n, n), got shape {tuple(gram.shape)}")
    return gram


def check_gram_pair(gram_x: Any, gram_y: Any) -> tuple[Array, Array]:
    """Two checked grams of the same shape (see `check_gram`)."""
    gram_x, gram_y = check_gram(gram_x, "gram_x"), check_gram(gram_y, "gram_y")
    if gram_x.shape != gram_y.shape:
        raise ValueError(f"grams must have the same shape, got {tuple(gram_x.shape)} and {tuple(gram_y.shape)}")
    return gram_x, gram_y


def host_matrix(x: Array) -> np.ndarray:
    """A checked x: (n, ...) -> float64 NumPy (n, p), for code that runs on the host."""
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1).astype(np.float64)


def is_real(value: Any) -> bool:
    """A Python or NumPy real number (not a bool: True is not a threshold or a level)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool (True is not a layer count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_number(value: Any, name: str, valid: Callable[[float], bool], requirement: str, traced: bool = False) -> None:
    """ValueError "`name` `requirement`, got value" unless value is a real number passing `valid`;
    traced=True lets a tracer through (its value is unknown until the program runs)."""
    if traced and isinstance(value, jax.core.Tracer):
        return
    if not (is_real(value) and valid(float(value))):
        raise ValueError(f"{name} {requirement}, got {value!r}")


def check_count(value: Any, name: str, minimum: int | None) -> None:
    """ValueError unless value is an integer (not a bool) >= minimum (any integer for None)."""
    if not is_int(value) or (minimum is not None and value < minimum):
        kind = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}"
        )
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_threshold(threshold: Any) -> None:
    """The RBF bandwidth factor: a positive finite number (or a tracer)."""
    check_number(threshold, "threshold", lambda t: 0 < t < math.inf, "must be a positive finite number", traced=True)


def named_layers(acts: Activations, side: str) -> list[tuple[str, Array]]:
    """acts (a list or mapping of per-layer arrays) -> [(label, checked array)], labels like
    "acts_a[2]" or "acts_a['logits']" for messages; dtype and empty axes checked here, the layout
    by `check_layers`."""
    if isinstance(acts, Mapping):
        items = [(f"{side}[{name!r}]", a) for name, a in acts.items()]
    elif isinstance(acts, (list, tuple)):
        items = [(f"{side}[{i}]", a) for i, a in enumerate(acts)]
    else:
        raise ValueError(f"{side} must be a list or a mapping of per-layer arrays, got {type(acts).__name__}")
    if not items:
        raise ValueError(f"{side} is empty: pass one activation array per layer")
    return [(label, check_input(a, label, min_ndim=0)) for label, a in items]


def check_layers(items: Sequence[tuple[str, Shaped]], num_models: int | None) -> int:
    """The minibatch size n of per-layer arrays (batch, ...), or (num_models, batch, ...); ValueError
    unless every layer has that layout, the same n, and n >= 4 (HSIC₁ needs 4 examples)."""
    lead = 1 if num_models is None else 2
    expected = "(batch, ...)" if num_models is None else f"({num_models} models, batch, ...)"
    sizes = []
    for label, a in items:
        shape = tuple(a.shape)
        if len(shape) < lead + 1 or (num_models is not None and shape[0] != num_models):
            raise ValueError(f"{label} must have shape {expected} with at least one feature axis, got {shape}")
        sizes.append((label, shape, shape[lead - 1]))
    first_label, first_shape, n = sizes[0]
    for label, shape, size in sizes[1:]:
        if size != n:
            raise ValueError(
                f"all layers need the same examples: {first_label} has shape {first_shape} "
                f"but {label} has shape {shape}"
            )
    if n < 4:
        raise ValueError(
            f"HSIC₁ needs at least 4 examples per minibatch, got {n} ({first_label} has shape {first_shape})"
        )
    return n


# ---- MinibatchCKA: a side's layout is (models, layers), models = 1 outside population mode ----

Layout = tuple[int, int]


def _check_side(items: Sequence[tuple[str, Shaped]], side: str, layout: Layout, population: bool) -> int:
    """The minibatch size of one side's layers; ValueError unless they match `layout`."""
    models, layers = layout
    if len(items) != layers:
        raise ValueError(f"{side} has {len(items)} layers, the accumulator expects {layers}")
    return check_layers(items, models if population else None)


def check_within(layouts: tuple[Layout, Layout], side: str) -> None:
    """ValueError unless the accumulator compares a model with itself (then `side` may be left out)."""
    (ma, la), (mb, lb) = layouts
    if (ma, la) != (mb, lb):
        raise ValueError(
            f"{side} is required: this accumulator compares two different models (heatmap shape {(ma, mb, la, lb)})"
        )


def check_minibatch(
    items_a: Sequence[tuple[str, Shaped]],
    items_b: Sequence[tuple[str, Shaped]] | None,
    layouts: tuple[Layout, Layout],
    population: bool,
) -> None:
    """One minibatch of both models' layers (from `named_layers`) against the accumulator's
    layouts; items_b None: only if the accumulator compares model a with itself."""
    n = _check_side(items_a, "acts_a", layouts[0], population)
    if items_b is None:
        check_within(layouts, "acts_b")
        return
    nb = _check_side(items_b, "acts_b", layouts[1], population)
    if nb != n:
        raise ValueError(f"acts_a and acts_b need the same minibatch: {n} vs {nb} examples")


def check_minibatch_grams(grams: Any, name: str, layout: Layout, population: bool) -> Array:
    """Checked grams (L, n, n), or (M, L, n, n) in population mode, n >= 4."""
    grams = check_input(grams, name, min_ndim=0)
    expected = layout if population else layout[1:]
    shape = tuple(grams.shape)
    if len(shape) != len(expected) + 2 or shape[:-2] != expected or shape[-1] != shape[-2]:
        raise ValueError(f"{name} must have shape {expected + ('n', 'n')}, got {shape}")
    if shape[-1] < 4:
        raise ValueError(f"HSIC₁ needs at least 4 examples per minibatch, got {name} of shape {shape}")
    return grams


def check_stacked(items: Sequence[tuple[str, Shaped]], devices: int, axis_name: str) -> int:
    """k of layers stacked as (k, ...) for `MinibatchCKA.update_sharded`; ValueError unless every
    layer has the same k, a positive multiple of the mesh axis size."""
    k = items[0][1].shape[0] if len(items[0][1].shape) else 0
    if k == 0 or k % devices or any(tuple(a.shape[:1]) != (k,) for _, a in items):
        shapes = ", ".join(f"{label}: {tuple(a.shape)}" for label, a in items)
        raise ValueError(
            f"update_sharded needs every layer stacked as (k, ...) with the same k, a multiple of the {devices} "
            f"devices on mesh axis {axis_name!r}; got {shapes}"
        )
    return k


# ---- compiled side: applied to checked inputs inside jitted code ----


def to_float(x: jax.Array) -> jax.Array:
    """A checked array in the float dtype it is computed in (see `float_dtype`)."""
    return jnp.asarray(x).astype(float_dtype(x.dtype))


def float_matrix(x: jax.Array) -> jax.Array:
    """A checked x: (n, ...) -> (n, p) in its float dtype."""
    x = to_float(x)
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def all_finite(*arrays: jax.Array) -> jax.Array:
    """Scalar bool: no NaN or inf in any of the arrays."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def nan_unless(finite: jax.Array, value: jax.Array) -> jax.Array:
    """value where `finite` holds, NaN otherwise: damaged inputs never give a plausible number."""
    return jnp.where(finite, value, jnp.nan)
