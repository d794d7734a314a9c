"""Where each minibatch's activations come from: two models run on one input, or a stream.

Both sources turn an element of `batches` into a payload, choose the layers on the first one,
check every payload's shapes (`check` -> batch size), and give the selected activations of one
payload (`acts`) or of k payloads stacked on a new leading axis (`stacked`, for the sharded
update), each a list per side, `None` for a model compared with itself. Activations without a
feature axis, (batch,), get one; in population mode, activations a stream or a function gives
must carry (models, batch, features...) themselves: (models, batch) could be read either way.

Compiled and eager forwards: Flax models, and functions JAX can trace, run as one compiled
forward per input shape. A function that JAX cannot trace (NumPy code, a PyTorch model) is run
eagerly: it gets each input as a NumPy array, and its outputs (NumPy, torch, JAX) are copied as
activations.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cka_jax._compare.adapters import Model
from cka_jax._compare.inputs import InputKey, as_array, model_input, stream_activations
from cka_jax._compare.layers import LayerSpec, ShapeCheck, select, shape_of


def _with_features(arrays: list, lead: int) -> list:
    return [a[..., None] if a.ndim == lead else a for a in arrays]


def _selected(model: Model, names: tuple[str, ...], lead: int):
    """(params, x) -> the activations of `names`, each with a feature axis."""
    forward = model.forward(names)
    return lambda params, x: _with_features(forward(params, x), lead)


# Compiled forwards by (model cache key, layers, kind): comparing checkpoint after checkpoint of one
# architecture compiles once (ResNet-50 forwards take tens of seconds to compile on CPU).
_COMPILED: OrderedDict = OrderedDict()
CACHE_SIZE = 16


def _eager(model: Model, names: tuple[str, ...], lead: int):
    """(params, x) -> the activations of `names` of a model JAX cannot trace, run on NumPy x."""

    def run(params, x):
        acts = model.capture(params, np.asarray(x))
        return _with_features([as_array(acts[n], f"{model.label}[{n!r}]") for n in names], lead)

    return run


def _traced_shapes(model: Model, x) -> OrderedDict:
    """Every layer's shape of `model` on input x, traced abstractly (no computation) when JAX can
    trace the model; a function it cannot trace is run once eagerly and marked `eager`."""
    try:
        found = jax.eval_shape(model.capture, model.params, jax.ShapeDtypeStruct(x.shape, x.dtype))
    except Exception:
        if not model.is_function:
            raise
        found = model.capture(model.params, np.asarray(x))  # its own error, if it fails on data too
        model.eager = True
    return OrderedDict((name, shape_of(s)) for name, s in found.items())


def _check_population_features(label: str, shapes: dict) -> None:
    """ValueError unless every activation of a population stream or function is (models, batch, ...features)."""
    for name, shape in shapes.items():
        if len(shape) < 3:
            raise ValueError(
                f"{label}[{name!r}] has shape {shape}: in population mode every activation is "
                "(models, batch, features...); give a (models, batch) one a feature axis, a[..., None]"
            )


def compiled(model: Model, names: tuple[str, ...], lead: int, vmapped: bool):
    """jit(forward) or jit(vmap(forward)) over stacked inputs, reused across calls when the model
    allows; a model JAX cannot trace gets its eager forward (one input at a time)."""
    if model.eager:
        return _eager(model, names, lead)
    key = None if model.cache_key is None else (model.cache_key, names, lead, vmapped)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    forward = _selected(model, names, lead)
    fn = jax.jit(jax.vmap(forward, in_axes=(None, 0)) if vmapped else forward)
    if key is not None:
        _COMPILED[key] = fn
        if len(_COMPILED) > CACHE_SIZE:
            _COMPILED.popitem(last=False)
    return fn


def _sizes_agree(label_a: str, size_a: int | None, label_b: str, size_b: int | None, all_pairs: bool) -> None:
    if size_a is not None and size_b is not None and size_a != size_b and not all_pairs:
        raise ValueError(
            f"{label_a} has {size_a} models and {label_b} {size_b}: a heatmap per model needs equal "
            "populations; pass all_pairs=True for every (a, b) model pair"
        )


class ModelSource:
    """model_a (and model_b) run on every input batch; selected layers only, jitted per input shape."""

    def __init__(
        self,
        model_a: Model,
        model_b: Model | None,
        layers_a: LayerSpec,
        layers_b: LayerSpec,
        input_key: InputKey,
        all_pairs: bool,
    ):
        self.models = [model_a] + ([model_b] if model_b is not None else [])
        self.specs = [layers_a, layers_b]
        self.input_key, self.all_pairs = input_key, all_pairs
        self.lead = 2 if model_a.population else 1
        self.check_shapes = ShapeCheck(self.lead)
        self.names: list[tuple[str, ...]] = []
        self.shapes: dict[tuple, list[list[tuple[int, ...]]]] = {}

    @property
    def self_compare(self) -> bool:
        return len(self.models) == 1

    def payload(self, batch, index: int):
        return model_input(batch, index, self.input_key)

    def prepare(self, x) -> None:
        """Captures every layer's shape abstractly (no computation) and selects the layers."""
        examples = x.shape[0]
        first = []
        for model, spec in zip(self.models, self.specs, strict=False):
            shapes = _traced_shapes(model, x)
            if model.population and model.is_function:
                _check_population_features(model.label, shapes)
            names = select(shapes, spec, model.label, self.lead, examples)
            self.names.append(names)
            first.append([shapes[name] for name in names])
            if model.population and model.num_models is None:  # a callable: its activations' model axis
                model.num_models = shapes[names[0]][0]
        if len(self.models) == 2:
            _sizes_agree("model_a", self.models[0].num_models, "model_b", self.models[1].num_models, self.all_pairs)
        self.shapes[(x.shape, str(x.dtype))] = first  # `check` traces the models again for new input shapes only
        self.forwards = [compiled(m, n, self.lead, False) for m, n in zip(self.models, self.names, strict=True)]

    def num_models(self) -> tuple[int | None, int | None]:
        sizes = [m.num_models for m in self.models]
        return sizes[0], sizes[-1] if len(sizes) == 2 else sizes[0]

    def check(self, index: int, x) -> int:
        key = (x.shape, str(x.dtype))
        if key not in self.shapes:
            spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
            self.shapes[key] = [
                [shape_of(s) for s in (f(m.params, x) if m.eager else jax.eval_shape(m.forward(n), m.params, spec))]
                for f, m, n in zip(self.forwards, self.models, self.names, strict=True)
            ]
        sides = [
            (m.label, dict(zip(n, s, strict=True)))
            for m, n, s in zip(self.models, self.names, self.shapes[key], strict=True)
        ]
        return self.check_shapes.check(index, sides)

    def stack_key(self, x) -> tuple:
        return x.shape, str(x.dtype)

    def acts(self, x) -> tuple[list, list | None]:
        out = [f(m.params, x) for f, m in zip(self.forwards, self.models, strict=True)]
        return out[0], out[1] if len(out) == 2 else None

    def stacked(self, xs: list, mesh) -> tuple[list, list | None]:
        """The activations of k inputs (k, batch, ...), computed where the sharded update reads them."""
        if any(m.eager for m in self.models):
            per_input = [self.acts(x) for x in xs]
            sides = [
                [np.stack(layer) for layer in zip(*(p[side] for p in per_input), strict=True)]
                for side in range(len(self.models))
            ]
            return sides[0], sides[1] if len(sides) == 2 else None
        if not hasattr(self, "replicated"):
            self.replicated = [jax.device_put(m.params, NamedSharding(mesh, P())) for m in self.models]
            self.vmapped = [compiled(m, n, self.lead, True) for m, n in zip(self.models, self.names, strict=True)]
        x = jax.device_put(np.stack([np.asarray(x) for x in xs]), NamedSharding(mesh, P("batch")))
        out = [f(p, x) for f, p in zip(self.vmapped, self.replicated, strict=True)]
        return out[0], out[1] if len(out) == 2 else None


class StreamSource:
    """Activations given by `batches` itself (``model_a=None``)."""

    def __init__(self, layers_a: LayerSpec, layers_b: LayerSpec, population: bool, all_pairs: bool):
        self.specs = [layers_a, layers_b]
        self.lead = 2 if population else 1
        self.all_pairs = all_pairs
        self.check_shapes = ShapeCheck(self.lead)
        self.labels = ["acts_a", "acts_b"]
        self.names: list[tuple[str, ...]] = []
        self.sizes: tuple[int | None, int | None] = (None, None)

    def payload(self, batch, index: int):
        return stream_activations(batch, index)

    def prepare(self, payload) -> None:
        acts = [a for a in payload if a is not None]
        self.pair = len(acts) == 2
        for side, (label, spec) in enumerate(zip(self.labels, self.specs, strict=True)):
            if side < len(acts):
                shapes = OrderedDict((name, shape_of(a)) for name, a in acts[side].items())
                self.names.append(select(shapes, spec, label, self.lead, None))  # sizes: ShapeCheck
        if self.lead == 2:
            for side, label in enumerate(self.labels[: len(acts)]):
                _check_population_features(label, {n: shape_of(acts[side][n]) for n in self.names[side]})
            sizes = [shape_of(acts[i][self.names[i][0]])[0] for i in range(len(acts))]
            self.sizes = (sizes[0], sizes[-1])
            if self.pair:
                _sizes_agree("acts_a", sizes[0], "acts_b", sizes[1], self.all_pairs)

    @property
    def self_compare(self) -> bool:
        return not self.pair

    def num_models(self) -> tuple[int | None, int | None]:
        return self.sizes

    def _selected(self, index: int, payload) -> list[OrderedDict]:
        acts = [a for a in payload if a is not None]
        if (len(acts) == 2) != self.pair:
            raise ValueError(
                f"batch {index} gives {'a pair (acts_a, acts_b)' if len(acts) == 2 else 'one mapping'} "
                f"but batch 0 gave {'a pair' if self.pair else 'one mapping'}: keep every batch alike"
            )
        out = []
        for label, names, found in zip(self.labels, self.names, acts, strict=False):
            missing = [n for n in names if n not in found]
            if missing:
                raise ValueError(f"batch {index}: {label} has no layer {missing[0]!r}; it has {list(found)}")
            out.append(OrderedDict((n, found[n]) for n in names))
        return out

    def check(self, index: int, payload) -> int:
        selected = self._selected(index, payload)
        sides = [
            (label, {n: shape_of(a) for n, a in acts.items()})
            for label, acts in zip(self.labels, selected, strict=False)
        ]
        return self.check_shapes.check(index, sides)

    def stack_key(self, payload) -> tuple:
        return tuple(shape_of(a) for acts in payload if acts is not None for a in acts.values())

    def acts(self, payload) -> tuple[list, list | None]:
        out = [_with_features(list(acts.values()), self.lead) for acts in self._selected(-1, payload)]
        return out[0], out[1] if len(out) == 2 else None

    def stacked(self, payloads: list, mesh) -> tuple[list, list | None]:
        per_batch = [self.acts(p) for p in payloads]
        out: list[Any] = []
        for side in range(2 if self.pair else 1):
            layers = zip(*(b[side] for b in per_batch), strict=True)
            out.append([jnp.stack(layer) if isinstance(layer[0], jax.Array) else np.stack(layer) for layer in layers])
        return out[0], out[1] if len(out) == 2 else None
