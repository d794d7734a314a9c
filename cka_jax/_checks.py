"""Input checks shared by every measure, run on the host before any compiled code.

Conventions: a representation is `x: (n, ...)`, n examples by any feature shape; trailing dims are
flattened to `(n, p)`. Inputs must be arrays (NumPy or JAX; Python lists are refused, as JAX does)
of real numbers: bool, integer and 16-bit float inputs are upcast to float32, float64 and 64-bit
integers to float64 with `jax_enable_x64`; complex, string and object arrays raise `ValueError`.
Every check reads only shapes and dtypes, so it runs on the host for concrete arrays and for
tracers alike (inside a user's jit or vmap); each failure is one `ValueError` line naming the
argument.

What a check returns is what compiled code reads (`cka_jax._owned`): host arrays become private
copies, with their values unchanged.

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

from cka_jax._owned import Array, owned

Activations = Sequence[Any] | Mapping[str, Any]


class Shaped(Protocol):
    """Anything with a shape: an array, a tracer, or a jax.ShapeDtypeStruct stand-in."""

    @property
    def shape(self) -> tuple[int, ...]: ...


def float_dtype(dtype: Any, name: str = "x") -> np.dtype:
    """The float dtype a real `dtype` is computed in; ValueError naming `name` for any other dtype.

    bool, integers and floats narrower than 64 bits -> float32; float64 and 64-bit integers ->
    float64 when `jax_enable_x64` is on (float32 otherwise: `owned` converts host arrays first).
    """
    dtype = np.dtype(dtype)
    real = dtype.kind in "biu" or (dtype.kind in "fV" and jnp.issubdtype(dtype, jnp.floating))
    if not real:
        raise ValueError(f"{name} must hold real numbers (bool, integer or float), got dtype {dtype}")
    wide = dtype.kind in "fiu" and dtype.itemsize >= 8
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64 if wide else jnp.float32))


def check_input(
    x: Any, name: str = "x", min_ndim: int = 2, centre_axis: int | None = None, scale_lead: int | None = None
) -> Array:
    """x as compiled code may read it: a JAX array or tracer as is, a host array (NumPy, or any
    array-like) as `owned` makes it, with `centre_axis` and `scale_lead` (see there).

    ValueError naming `name` unless x is an array (not a Python list or tuple) of real numbers
    with at least `min_ndim` dims and no zero-length axis.
    """
    return owned(validated(x, name, min_ndim), name, centre_axis, scale_lead)


def validated(x: Any, name: str = "x", min_ndim: int = 2) -> Array:
    """`check_input` without taking ownership: x as a NumPy or JAX array, dtype unchanged."""
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


def check_pair(x: Any, y: Any, own: bool = True) -> tuple[Array, Array]:
    """Checked representations x: (n, ...), y: (n, ...) (see `check_input`) of a measure that
    depends neither on per-feature offsets nor on scale; ValueError unless both have the same n.
    own=False: validated only (for code that copies them to float64 on the host itself)."""
    if own:
        xc, yc = check_input(x, "x", centre_axis=0, scale_lead=0), check_input(y, "y", centre_axis=0, scale_lead=0)
    else:
        xc, yc = validated(x, "x"), validated(y, "y")
    if xc.shape[0] != yc.shape[0]:
        raise ValueError(
            f"x and y must be (n, ...) arrays with the same number n of examples; got {np.shape(x)} and {np.shape(y)}"
        )
    return xc, yc


def check_gram(gram: Any, name: str = "gram", scale_free: bool = False) -> Array:
    """A checked square (..., n, n) gram; ValueError naming `name` otherwise. scale_free: the
    result does not depend on each gram's scale (`owned` may rescale each one)."""
    gram = validated(gram, name)
    if gram.shape[-2] != gram.shape[-1]:
        raise ValueError(f"{name} must be square, (..., n, n), got shape {tuple(gram.shape)}")
    return owned(gram, name, scale_lead=gram.ndim - 2 if scale_free else None)


def check_gram_pair(gram_x: Any, gram_y: Any, scale_free: bool = False) -> tuple[Array, Array]:
    """Two checked grams of the same shape (see `check_gram`)."""
    gram_x, gram_y = check_gram(gram_x, "gram_x", scale_free), check_gram(gram_y, "gram_y", scale_free)
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


def check_flag(value: Any, name: str) -> None:
    """ValueError unless value is a bool (Python or NumPy): "no" or 0.5 is not a switch."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_count(value: Any, name: str, minimum: int | None) -> None:
    """ValueError unless value is an integer (not a bool) >= minimum (any integer for None). A count
    (minimum given) sizes an array axis, so it must also be at most 2**31 - 1, not wrap on the way in."""
    if not is_int(value) or (minimum is not None and value < minimum):
        kind = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}"
        )
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if minimum is not None and value > 2**31 - 1:
        raise ValueError(f"{name}={value} is too large: it sizes an array axis, at most 2**31 - 1")


def check_threshold(threshold: Any) -> None:
    """The RBF bandwidth factor: a positive finite number (or a tracer)."""
    check_number(threshold, "threshold", lambda t: 0 < t < math.inf, "must be a positive finite number", traced=True)


def named_layers(acts: Activations, side: str) -> list[tuple[str, Array]]:
    """acts (a list or mapping of per-layer arrays) -> [(label, validated array)], labels like
    "acts_a[2]" or "acts_a['logits']" for messages; dtype and empty axes checked here, the layout
    by `check_layers`, ownership taken by `owned_layers` once the layout is known."""
    if isinstance(acts, Mapping):
        items = [(f"{side}[{name!r}]", a) for name, a in acts.items()]
    elif isinstance(acts, (list, tuple)):
        items = [(f"{side}[{i}]", a) for i, a in enumerate(acts)]
    else:
        raise ValueError(f"{side} must be a list or a mapping of per-layer arrays, got {type(acts).__name__}")
    if not items:
        raise ValueError(f"{side} is empty: pass one activation array per layer")
    return [(label, validated(a, label, min_ndim=0)) for label, a in items]


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
    """Checked U-centred grams (L, n, n), or (M, L, n, n) in population mode, n >= 4, `owned`;
    ValueError unless they are symmetric with zero diagonal and zero row sums up to rounding
    (`check_symmetric`)."""
    grams = validated(grams, name, min_ndim=0)
    expected = layout if population else layout[1:]
    shape = tuple(grams.shape)
    if len(shape) != len(expected) + 2 or shape[:-2] != expected or shape[-1] != shape[-2]:
        raise ValueError(f"{name} must have shape {expected + ('n', 'n')}, got {shape}")
    if shape[-1] < 4:
        raise ValueError(f"HSIC₁ needs at least 4 examples per minibatch, got {name} of shape {shape}")
    grams = owned(grams, name)  # a gram's scale is its minibatch's weight: kept
    check_symmetric(grams, name, u_centred=True)
    return grams


def _gram_defects(grams: Any, xp: Any) -> tuple[Any, Any, Any]:
    """Largest |G - Gᵀ|, |diag G| and |row sum of G| of grams (..., n, n), each relative to the
    gram's largest entry or largest row of absolute values (NaN grams give NaN)."""
    grams = grams.astype(xp.float32) if grams.dtype.itemsize < 4 or grams.dtype.kind != "f" else grams
    size = xp.max(xp.abs(grams), axis=(-2, -1))
    rows = xp.max(xp.sum(xp.abs(grams), axis=-1), axis=-1)
    asym = xp.max(xp.abs(grams - xp.swapaxes(grams, -1, -2)), axis=(-2, -1)) / size
    diag = xp.max(xp.abs(xp.diagonal(grams, axis1=-2, axis2=-1)), axis=-1) / size
    sums = xp.max(xp.abs(xp.sum(grams, axis=-1)), axis=-1) / rows
    return xp.max(asym), xp.max(diag), xp.max(sums)


_device_gram_defects = jax.jit(lambda grams: _gram_defects(grams, jnp))


def check_symmetric(grams: Array, name: str, u_centred: bool = False) -> None:
    """ValueError naming `name` unless the concrete grams (..., n, n) are symmetric, and with
    u_centred also U-centred (zero diagonal, zero row sums), up to rounding. Tracers are not
    checked (their values are unknown until the program runs); all-zero or NaN grams pass."""
    if isinstance(grams, jax.core.Tracer):
        return
    with np.errstate(all="ignore"):
        if isinstance(grams, jax.Array):
            asym, diag, sums = (float(v) for v in jax.device_get(_device_gram_defects(grams)))
        else:
            asym, diag, sums = (float(v) for v in _gram_defects(np.asarray(grams), np))
    tolerance = max(1e-3, 64 * float(np.finfo(float_dtype(grams.dtype)).eps))
    if asym > tolerance:
        raise ValueError(
            f"{name} is not symmetric (|G - Gᵀ| up to {asym:.2g} of its largest entry): pass grams K = k(x_i, x_j)"
        )
    if u_centred and (diag > tolerance or sums > tolerance):
        raise ValueError(
            f"{name} is not U-centred (diagonal up to {diag:.2g} of the largest entry, row sums up to {sums:.2g} "
            "of the largest row): pass the grams of cka_jax.minibatch_grams, or U-centre them with "
            "cka_jax.center_gram(gram, unbiased=True)"
        )


def check_stacked(items: Sequence[tuple[str, Shaped]], mesh: Any, axis_name: Any) -> int:
    """k of layers stacked as (k, ...) for `MinibatchCKA.update_sharded`; ValueError unless mesh
    is a Mesh with an axis `axis_name` and every layer has the same k, a positive multiple of
    that axis's size."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((k,), ('batch',))), got {mesh!r}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh; its axes are {mesh.axis_names}")
    devices = mesh.shape[axis_name]
    k = items[0][1].shape[0] if len(items[0][1].shape) else 0
    if k == 0 or k % devices or any(tuple(a.shape[:1]) != (k,) for _, a in items):
        shapes = ", ".join(f"{label}: {tuple(a.shape)}" for label, a in items)
        raise ValueError(
            f"update_sharded needs every layer stacked as (k, ...) with the same k, a multiple of the {devices} "
            f"devices on mesh axis {axis_name!r}; got {shapes}"
        )
    return k


# ---- compiled side: applied to checked inputs inside jitted code ----


def one_minibatch(items: Sequence[tuple[str, Array]]) -> list[tuple[str, jax.ShapeDtypeStruct]]:
    """Stand-ins (shape and dtype only) for one minibatch of layers stacked as (k, ...)."""
    return [(label, jax.ShapeDtypeStruct(a.shape[1:], a.dtype)) for label, a in items]


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
