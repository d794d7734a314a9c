"""Host arrays as compiled code reads them: private copies, values unchanged on the way in.

JAX on CPU may compute from a NumPy buffer without copying it (a 64-byte aligned one), and a
dispatched computation may read it after the call has returned: a caller that refills or edits
its array would change a result already returned. Every public entry point therefore hands its
compiled program `owned` arrays. On the way, no value changes: 64-bit integers are never wrapped
to int32, and float64 without `jax_enable_x64` reaches float32 without losing its range, or is
refused where it cannot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

Array = jax.Array | np.ndarray

ALIGNMENT = 64  # bytes: XLA:CPU computes from a host buffer aligned to this without copying it


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous host array aligned to ALIGNMENT bytes, which JAX on CPU reads
    without copying it (so it must not be written after it is handed to JAX)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def owned_copy(x: np.ndarray, dtype: Any = None) -> np.ndarray:
    """A private C-contiguous copy of host array x (converted to `dtype`, default x's), aligned to
    ALIGNMENT bytes so that JAX on CPU reads it without copying it a second time."""
    out = aligned_empty(x.shape, x.dtype if dtype is None else dtype)
    np.copyto(out, x, casting="unsafe")
    return out


def x64_enabled() -> bool:
    """Whether JAX computes in float64 (`jax_enable_x64`, also inside `jax.enable_x64()`)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64)) == np.float64


def owned(x: Array, name: str = "x", centre_axis: int | None = None, scale_lead: int | None = None) -> Array:
    """A checked x as compiled code may read it at any later time, with the values the caller gave.

    A JAX array (immutable) or a tracer is returned as is. A host array becomes a private copy
    (`owned_copy`): JAX on CPU may compute from a host buffer after the call has returned, so a
    caller refilling or editing its array would otherwise change a result already returned. On
    the way, 64-bit integers become float64 (JAX without `jax_enable_x64` would wrap them to
    int32), and without `jax_enable_x64` float64 becomes float32 without losing its range: in
    float64 on the host, x is multiplied by a power of two per index of its first `scale_lead`
    axes and centred along `centre_axis`, where the caller's measure does not depend on that
    scale or on per-feature offsets along that axis (None: it does). Where neither is allowed,
    float64 values float32 cannot hold raise ValueError naming `name`.
    """
    if isinstance(x, (jax.Array, jax.core.Tracer)):
        return x
    x = np.asarray(x)
    if x.dtype.itemsize < 8 or x.dtype.kind not in "fiu":
        return owned_copy(x)
    if x64_enabled():
        return owned_copy(x, np.float64)
    return owned_copy(_float32_range(x, name, centre_axis, scale_lead), np.float32)


def _float32_range(x: np.ndarray, name: str, centre_axis: int | None, scale_lead: int | None) -> np.ndarray:
    """float64 x, centred and rescaled as `owned` allows, with values float32 can hold."""
    with np.errstate(all="ignore"):  # NaN and inf go through and make the result NaN
        x = x.astype(np.float64)
        if scale_lead is not None:
            x = unit_scale(x, scale_lead)  # first, so that centring cannot overflow
        if centre_axis is not None:
            x = x - np.take(x, [0], axis=centre_axis)  # constant features become exact zeros
            x = x - np.mean(x, axis=centre_axis, keepdims=True)
        if scale_lead is not None:
            return unit_scale(x, scale_lead)
        finite = np.abs(x[np.isfinite(x)])
        largest = float(finite.max()) if finite.size else 0.0
        info = np.finfo(np.float32)
        if largest > info.max or 0 < largest < info.tiny:
            raise ValueError(
                f"{name} holds float64 values of magnitude up to {largest:.3g}, outside float32's range "
                f"({info.tiny:.3g} to {info.max:.3g}); enable 64-bit mode "
                "(jax.config.update('jax_enable_x64', True)) or rescale it"
            )
        return x


def unit_scale(x: np.ndarray, lead: int = 0) -> np.ndarray:
    """x times the power of two (exact) that brings its largest finite magnitude over all but the
    first `lead` axes into [1, 2), per index of those axes; all-zero or non-finite parts as they are."""
    largest = np.max(np.abs(x), axis=tuple(range(lead, x.ndim)), keepdims=True)
    usable = np.isfinite(largest) & (largest > 0)
    exponent = np.frexp(np.where(usable, largest, 1.0))[1]
    return np.ldexp(x, np.where(usable, 1 - exponent, 0))


def owned_layers(items: Sequence[tuple[str, Array]], examples_axis: int) -> list[Array]:
    """The arrays of checked layers (see `check_layers`), `owned` with their examples on
    `examples_axis`: a minibatch's HSIC₁ does not depend on per-feature offsets within it. Its
    scale is its weight in the sums over minibatches, so it is not rescaled on the host (the
    compiled update rescales exactly and keeps the units)."""
    return [owned(a, label, examples_axis) for label, a in items]
