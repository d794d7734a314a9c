"""What `batches` yields: model inputs, or activations for the activation-stream mode.

Inputs: an array (NumPy, JAX, or anything with ``__array__``: torch CPU tensors, tf tensors),
or a tuple/list whose element `input_key` (default 0: the x of (x, y) loaders) is the input, or
a mapping (tfds, grain) whose key `input_key` is the input; `input_key` may also be a function
batch -> input.
Activations (``model_a=None``): a mapping name -> activation (one model, compared with
itself) or a pair ``(acts_a, acts_b)`` of such mappings, every batch alike.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any

import jax
import numpy as np

from cka_jax._owned import owned, owned_copy, x64_enabled

InputKey = int | str | Callable[[Any], Any]


def as_array(value, what: str):
    """A JAX or NumPy array as is; torch/tf tensors and array-likes as NumPy (ValueError if not numeric)."""
    if isinstance(value, (jax.Array, np.ndarray)):
        array = value
    else:
        if hasattr(value, "detach"):  # torch: leave the autograd graph and the accelerator
            value = value.detach().cpu()
        try:
            array = np.asarray(value)
        except Exception as error:  # noqa: BLE001 - any conversion failure is the caller's input error
            raise ValueError(f"{what} is not an array: {type(value).__name__} ({error})") from None
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_ or str(array.dtype) == "bfloat16"):
        raise ValueError(f"{what} must hold numbers, got dtype {array.dtype}")
    return array


def model_input(batch, index: int, input_key: InputKey):
    """The model input of one element of `batches`: (batch, ...)."""
    what = f"batch {index}"
    if callable(input_key):
        value = input_key(batch)
    elif isinstance(batch, Mapping):
        if not isinstance(input_key, str):
            raise ValueError(f"{what} is a mapping with keys {list(batch)}: pass input_key='<key of the input>'")
        if input_key not in batch:
            raise ValueError(f"{what} has no key {input_key!r}; its keys are {list(batch)}")
        value = batch[input_key]
    elif isinstance(batch, (tuple, list)):
        if not isinstance(input_key, int) or not -len(batch) <= input_key < len(batch):
            raise ValueError(
                f"{what} is a {type(batch).__name__} of {len(batch)} elements: input_key={input_key!r} "
                "must be the index of the input"
            )
        value = batch[input_key]
    else:
        value = batch
    x = as_array(value, f"the input of {what}")
    if x.ndim < 1:
        raise ValueError(f"the input of {what} must be (batch, ...), got a scalar")
    return owned_input(x, f"the input of {what}")


def owned_input(x, what: str):
    """A model input as the compiled forward may read it at any later time: a JAX array as is, a
    host array as a private copy (the caller's loader may refill its buffer). Without
    `jax_enable_x64`, 64-bit integers become 32-bit ones when every value fits (ValueError naming
    `what` otherwise: JAX would wrap them) and float64 becomes float32 when its values fit
    (`cka_jax._owned.owned`)."""
    if isinstance(x, jax.Array) or x64_enabled() or x.dtype.itemsize < 8 or x.dtype.kind == "f":
        return owned(x, what)
    narrow = np.dtype(np.int32 if x.dtype.kind == "i" else np.uint32)
    info = np.iinfo(narrow)
    if x.size and (x.min() < info.min or x.max() > info.max):
        raise ValueError(
            f"{what} holds {x.dtype} values from {x.min()} to {x.max()}, beyond {narrow}, which JAX uses without "
            "64-bit mode: enable it (jax.config.update('jax_enable_x64', True)) or map the values into range"
        )
    return owned_copy(x, narrow)


def stream_activations(batch, index: int) -> tuple[OrderedDict, OrderedDict | None]:
    """One element of an activation stream -> (acts_a, acts_b or None), arrays by name."""
    if isinstance(batch, Mapping):
        pair = (batch, None)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(b, Mapping) for b in batch):
        pair = tuple(batch)
    else:
        raise ValueError(
            f"batch {index}: with model_a=None every batch is a mapping name -> activation, or a pair "
            f"(acts_a, acts_b) of them; got {type(batch).__name__}"
        )
    out: list[OrderedDict[str, Any] | None] = []
    for side, acts in zip(("a", "b"), pair, strict=True):
        if acts is None:
            out.append(None)
            continue
        if not acts:
            raise ValueError(f"batch {index}: acts_{side} is empty")
        out.append(
            OrderedDict((str(name), as_array(a, f"batch {index}: acts_{side}[{name!r}]")) for name, a in acts.items())
        )
    first, second = out
    assert first is not None  # acts_a is always given
    return first, second


def numbered(batches: Iterable, progress: bool, max_batches: int | None) -> Iterator[tuple[int, Any]]:
    """(index, element) over `batches`, with a tqdm bar unless progress=False; ValueError if empty."""
    if isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
        raise ValueError(
            f"batches must be an iterable of minibatches (a list, a generator, a data loader), "
            f"got {type(batches).__name__}"
        )
    if isinstance(batches, (np.ndarray, jax.Array)):
        raise ValueError(
            f"batches is one array of shape {np.shape(batches)}; pass a list of minibatches "
            "(e.g. np.array_split(x, n_batches)) or a data loader"
        )
    total = len(batches) if isinstance(batches, Sized) else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = None
    if progress:
        from tqdm import tqdm  # plain tqdm: tqdm.auto warns in notebooks without ipywidgets

        bar = tqdm(total=total, desc="CKA", unit="batch")
    count = 0
    chosen = batches if max_batches is None else itertools.islice(batches, max_batches)  # never reads one more
    try:
        for index, batch in enumerate(chosen):
            count += 1
            yield index, batch
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if count == 0:
        raise ValueError("batches is empty: give at least one minibatch of at least 4 examples")
