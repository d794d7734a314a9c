"""Linear grams built on the host, straight from the caller's arrays, on the CPU backend (host code).

On CPU the host is the device. NumPy builds each raw gram x xᵀ with BLAS's symmetric rank-k
update (half the FLOPs of a general matmul) from the caller's buffer where it lies: no copy of
the activations, and nothing left for compiled code to read after `update` returns. Grams are
built in parallel, one single-threaded BLAS call per worker (small grams keep the cores busier
so than as multi-threaded calls one after another), each checked (`raw_gram_usable`),
U-centred while still in cache and kept as its strict upper triangle (`upper`). Where the raw
gram would lose precision to large feature means, the gram of x - x[0] is built instead (the
same gram once U-centred); where that is unusable too (extreme scales, NaN, inf), the layer goes
to compiled code as activations (`owned`, mode SHIFTED), which rescales them exactly. Tracers,
arrays on other devices, and dtypes that compiled code would convert (integers, 16-bit floats,
float64 without `jax_enable_x64`) take the compiled route (mode AUTO).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TYPE_CHECKING

import jax
import numpy as np

from cka_jax._checks import float_dtype
from cka_jax._layer_grams import AUTO, CENTRED, MAX_OFFSET_RATIO, SHIFTED, LayerInputs, raw_gram_usable
from cka_jax._owned import Array, aligned_empty, owned, owned_layers

if TYPE_CHECKING:
    from threadpoolctl import ThreadpoolController


def host_readable(x: Array) -> np.ndarray | None:
    """x as a NumPy array read in place, where the CPU backend computes it and x's dtype is the
    one compiled code computes in; None where x takes the compiled route."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array):
        devices = x.devices()
        if len(devices) != 1 or next(iter(devices)).platform != "cpu":
            return None
    elif jax.default_backend() != "cpu":
        return None
    x = np.asarray(x)  # a CPU jax.Array: a read-only view of its buffer
    return x if x.dtype == float_dtype(x.dtype) else None


def ucentre_in_place(gram: np.ndarray, sums: np.ndarray) -> None:
    """`cka_jax._hsic.ucenter(gram, unbiased=True)` of one (n, n) host gram, written over it;
    sums: its column sums, diagonal included."""
    n = gram.shape[0]
    means = (sums - np.diagonal(gram)) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    np.fill_diagonal(gram, 0)


_scratch = threading.local()  # each worker's gram and shifted-activation buffers


@cache
def _upper_mask(n: int) -> np.ndarray:
    """An (n, n) matrix's strict upper triangle as a boolean mask: `upper`'s entries, in its order."""
    return np.triu(np.ones((n, n), bool), 1)


def _scratch_array(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """This worker thread's buffer `name` of that shape and dtype, reused while it stays in cache."""
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
        buffer = np.empty(shape, dtype)
        setattr(_scratch, name, buffer)
    return buffer


def _offset_likely(x: np.ndarray) -> bool:
    """Whether x's first 8 examples suggest a raw gram that `raw_gram_usable` would refuse: a guess
    (the gram itself decides) that saves building that gram for layers with large feature means."""
    head = x[:8].astype(np.float64)
    with np.errstate(all="ignore"):  # NaN or inf: either guess is checked by the gram
        squares = np.einsum("ij,ij->", head, head)
        centred = head - head.mean(axis=0)
        spread = np.einsum("ij,ij->", centred, centred) * len(head) / max(len(head) - 1, 1)
        return bool(squares > MAX_OFFSET_RATIO / 2 * spread)


def _usable_gram(x: np.ndarray, shift: bool) -> np.ndarray | None:
    """This worker's gram of x: (n, p), minus x[0] first if `shift`, U-centred; None where
    `raw_gram_usable` refuses it."""
    n = x.shape[0]
    gram = _scratch_array("gram", (n, n), x.dtype)
    with np.errstate(all="ignore"):  # overflow, NaN or inf: not usable, and said by the result
        if shift:
            x = np.subtract(x, x[:1], out=_scratch_array("shifted", x.shape, x.dtype))
        np.matmul(x, x.T, out=gram)  # one operand and its transpose: BLAS syrk
        sums = gram.sum(axis=0)
        if not raw_gram_usable(np.trace(gram), sums.sum(), n, gram.dtype):
            return None
    ucentre_in_place(gram, sums)
    return gram


def _centred_gram(x: np.ndarray, out: np.ndarray) -> bool:
    """Writes the U-centred gram of x: (n, p) as its strict upper triangle (`upper`) into out (D,):
    the raw gram x xᵀ where it is usable, else that of x - x[0] (as exact as compiled code's shifted
    gram unless the range is extreme); whether either was usable.

    Subtracting the first example changes the gram only by terms U-centring removes, and removes
    the features' means, which cost the raw gram its precision.
    """
    first = _offset_likely(x)
    gram = _usable_gram(x, first)
    if gram is None:
        gram = _usable_gram(x, not first)
    if gram is not None:
        out[...] = gram[_upper_mask(x.shape[0])]
    return gram is not None


@cache
def _workers() -> tuple[ThreadPoolExecutor, ThreadpoolController, threading.Lock]:
    """The gram workers (one per core), the BLAS thread-count controller, and the lock that lets
    one caller at a time limit BLAS's threads (the limit is process-wide), made on first use."""
    from threadpoolctl import ThreadpoolController  # here: `import cka_jax` loads only jax, numpy, scipy

    pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="cka_jax-grams")
    return pool, ThreadpoolController(), threading.Lock()


os.register_at_fork(after_in_child=_workers.cache_clear)  # a forked child has none of the parent's threads


Grams = tuple[dict[int, np.ndarray], np.ndarray]  # layers l -> (M, n, p), and their (M, L, D) output


def _centred_grams(sides: list[Grams]) -> list[dict[int, bool]]:
    """U-centred grams of every side's layers xs[l]: (M, n, p) as upper triangles into its
    out[:, l], in parallel; per side, which layers' grams were usable (every model's)."""
    jobs = [(s, l, m) for s, (xs, out) in enumerate(sides) for l in xs for m in range(out.shape[0])]
    pool, blas, lock = _workers()
    threads = os.cpu_count() or 1
    workers = max(1, min(threads, len(jobs)))

    def run(share: list[tuple[int, int, int]]) -> list[tuple[int, int, bool]]:
        return [(s, l, _centred_gram(sides[s][0][l][m], sides[s][1][m, l])) for s, l, m in share]

    usable = [dict.fromkeys(xs, True) for xs, _ in sides]
    with lock, blas.limit(limits=max(1, threads // workers), user_api="blas"):
        for s, l, ok in (
            result for share in pool.map(run, [jobs[i::workers] for i in range(workers)]) for result in share
        ):
            usable[s][l] &= ok
    return usable


def _readable_layers(items: Sequence[tuple[str, Array]], examples_axis: int) -> Grams | None:
    """The layers whose grams the host builds, as (M, n, p) views, and an output for them."""
    xs = {l: x for l, (_, a) in enumerate(items) if (x := host_readable(a)) is not None}
    dtype = np.result_type(*xs.values()) if xs else None
    xs = {l: x.reshape(*x.shape[: examples_axis + 1], -1) for l, x in xs.items() if x.dtype == dtype and x.size}
    if not xs:
        return None
    first = next(iter(xs.values()))
    models, n = math.prod(first.shape[:examples_axis]), first.shape[examples_axis]
    out = aligned_empty((models, len(items), n * (n - 1) // 2), dtype)
    return {l: x.reshape(models, n, -1) for l, x in xs.items()}, out


def host_sides(
    sides: list[Sequence[tuple[str, Array]]], examples_axis: int
) -> list[tuple[LayerInputs, tuple[str, ...]]]:
    """Each side's checked layers (see `check_layers`) with their examples on `examples_axis` as
    compiled code takes them (`LayerInputs`), and each layer's mode: CENTRED (U-centred gram built
    here), SHIFTED (unusable here) or AUTO (compiled code builds it). One parallel run for all."""
    readable = [_readable_layers(items, examples_axis) for items in sides]
    built = iter(_centred_grams([r for r in readable if r is not None]))
    out = []
    for items, grams in zip(sides, readable, strict=True):
        usable = {} if grams is None else next(built)
        modes = tuple(AUTO if l not in usable else CENTRED if usable[l] else SHIFTED for l in range(len(items)))
        acts = [
            None if mode == CENTRED else owned(a, label, examples_axis)
            for (label, a), mode in zip(items, modes, strict=True)
        ]
        centred = None if grams is None or CENTRED not in modes else grams[1]
        out.append((LayerInputs(acts, centred), modes))
    return out


def host_side(items: Sequence[tuple[str, Array]], examples_axis: int) -> tuple[LayerInputs, tuple[str, ...]]:
    """`host_sides` of one side."""
    return host_sides([items], examples_axis)[0]


def owned_sides(
    items_a: list[tuple[str, Array]], items_b: list[tuple[str, Array]] | None, examples_axis: int
) -> tuple[list[Array], list[Array] | None, bool]:
    """Both sides' checked arrays as compiled code reads them (`owned_layers`), and whether b's
    are a's very arrays (then b's list is None and their grams are built once)."""
    arrays_a = owned_layers(items_a, examples_axis)
    if items_b is None:
        return arrays_a, None, False
    if same_layers(items_a, items_b):
        return arrays_a, None, True
    return arrays_a, owned_layers(items_b, examples_axis), False


def update_sides(
    items_a: list[tuple[str, Array]], items_b: list[tuple[str, Array]] | None, population: bool, kernel: str
) -> tuple[LayerInputs, LayerInputs | None, bool, tuple[tuple[str, ...] | None, tuple[str, ...] | None]]:
    """`update`'s arguments of compiled code: both sides' `LayerInputs` (linear grams built on the
    host where it computes them, `host_sides`), whether b's layers are a's, and each side's modes."""
    if kernel != "linear":
        arrays_a, arrays_b, b_is_a = owned_sides(items_a, items_b, int(population))
        return LayerInputs(arrays_a), None if arrays_b is None else LayerInputs(arrays_b), b_is_a, (None, None)
    if items_b is None or same_layers(items_a, items_b):
        side_a, modes_a = host_side(items_a, int(population))
        return side_a, None, items_b is not None, (modes_a, modes_a)
    (side_a, modes_a), (side_b, modes_b) = host_sides([items_a, items_b], int(population))
    return side_a, side_b, False, (modes_a, modes_b)


def same_layers(items_a: list[tuple[str, Array]], items_b: list[tuple[str, Array]]) -> bool:
    """Whether b's layers are a's very arrays."""
    return len(items_a) == len(items_b) and all(a is b for (_, a), (_, b) in zip(items_a, items_b, strict=True))
