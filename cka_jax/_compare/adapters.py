"""Models as pure functions ``(params, x) -> OrderedDict name -> activation``, in network order.

Kinds (`as_model`):
  (module, variables[, apply_kwargs])  Flax linen. Every submodule's ``__call__`` output
      (``capture_intermediates``) and every value sown into ``"intermediates"``, named by module
      path (``Conv_0``, ``block2/conv``, ``block2/feat``), in the order the calls finish; the
      module's own output is ``output``. A `cka_jax.models` ResNet reports its own layer names
      instead (``stem``, ``stage1/block1/post_residual``, ..., ``pool``, ``logits``).
  an NNX module  ``nnx.capture(..., method_outputs=nnx.Intermediate)`` on an evaluation-mode copy
      (``.eval()``: no dropout, BatchNorm running averages): every submodule's public method
      outputs and every ``sow(nnx.Intermediate, ...)``, named by attribute path (``conv1``,
      ``layers/0``, ``block/feat``), ordered by where the trace computes them; a value several
      modules return (eval-mode dropout passes its input on) by the order their calls finish.
  a callable  ``x -> mapping name -> activation``; names in the mapping's order. It is compiled
      when JAX can trace it; one that cannot (NumPy code, a PyTorch model) is run eagerly on
      NumPy inputs (`cka_jax._compare.sources`).
A module called more than once reports ``name#1``, ``name#2``, ...; a structured output (tuple,
dict) reports one layer per array leaf (``name/0``, ``name/key``). A value captured twice (a
parent returning its last child's output, ``output`` of a model ending in a layer, eval-mode
dropout) is listed once, under its first name in network order.

Population mode: linen variables and NNX state carry a leading model axis (every leaf), and the
capture is vmapped over it; a callable returns (models, batch, ...) activations itself.
flax is imported only when a Flax model is seen.
"""

from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

ROOT = "output"  # name of the module's own output

Capture = Callable[[Any, Any], "OrderedDict[str, jax.Array]"]  # (params, x): x a JAX or NumPy array


class Model:
    """One side of a comparison: `capture(params, x)` -> every layer, network order.

    x: (batch, ...) -> activations (batch, ...), or (models, batch, ...) when `population`.
    `params` (variables, NNX state or None) is an argument of the jitted forward, not a constant
    baked into it. `cache_key`: equal for models whose capture is the same function of (params, x)
    (same linen module and apply kwargs, same NNX graph), so a compiled forward can be reused;
    None for callables, which may close over values that change between calls.
    """

    def __init__(
        self,
        label: str,
        name: str,
        params: Any,
        capture: Capture,
        population: bool,
        num_models: int | None = None,
        cache_key: Any = None,
    ):
        self.label, self.name, self.params = label, name, params
        self.capture, self.population, self.num_models = capture, population, num_models
        self.cache_key = _hashable(cache_key)
        self.is_function = False  # a plain function x -> {name: activation}, not a Flax model
        self.eager = False  # set when JAX cannot trace the function: run it on NumPy inputs

    def forward(self, names: tuple[str, ...]) -> Callable[[Any, jax.Array], list[jax.Array]]:
        """(params, x) -> the activations of `names`, in that order."""
        capture = self.capture

        def run(params, x):
            acts = capture(params, x)
            return [acts[name] for name in names]

        return run


def _hashable(key: Any) -> Any:
    """key if it can key a dict (a module with list fields, kwargs holding arrays cannot), else None."""
    try:
        hash(key)
    except TypeError:
        return None
    return key


def named_leaves(path: tuple, calls: Any) -> list[tuple[str, Any]]:
    """Captured values of one module path -> (name, array) pairs; `calls` holds one value per call."""
    base = "/".join(str(p) for p in path if p != "__call__") or ROOT
    calls = calls if isinstance(calls, tuple) else (calls,)
    out = []
    for k, value in enumerate(calls):
        name = base if len(calls) == 1 else f"{base}#{k + 1}"
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                suffix = "/".join(_key_name(k) for k in key_path)
                out.append((f"{name}/{suffix}" if suffix else name, leaf))
    return out


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def unique(pairs: list[tuple[str, Any]]) -> OrderedDict:
    """(name, array) pairs -> OrderedDict; a repeated name gets ``~2``, ``~3`` so none is lost."""
    out: OrderedDict = OrderedDict()
    for name, value in pairs:
        key, k = name, 1
        while key in out:
            k += 1
            key = f"{name}~{k}"
        out[key] = value
    return out


def first_of_each(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Drops pairs whose array is the very object of an earlier pair (same traced value)."""
    seen: set[int] = set()
    out = []
    for name, value in pairs:
        if id(value) not in seen:
            seen.add(id(value))
            out.append((name, value))
    return out


def _walk_linen(tree: Mapping, path: tuple = ()):
    """Linen's intermediates (nested dicts of per-call tuples, in insertion = call order)."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _walk_linen(value, path + (key,))
        else:
            yield path + (key,), value


def _population_size(params: Any, label: str) -> int:
    """The leading model axis shared by every leaf of `params`."""
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(params)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{label}: population=True needs every parameter stacked on a leading model axis; "
            f"leading sizes found: {sorted(map(str, sizes))}"
        )
    return int(sizes.pop())  # type: ignore[arg-type]  # not None: checked above


def _names_its_layers(module) -> bool:
    """Whether a linen module reports its own named representations, as `cka_jax.models` ResNets
    do (`layer_names()` and ``apply(..., capture="all") -> (logits, {name: activation})``). Asked
    by duck typing: the library layer does not import the models layer."""
    return callable(getattr(module, "layer_names", None)) and "capture" in _call_parameters(module)


def _call_parameters(module) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(type(module).__call__).parameters)
    except (TypeError, ValueError):
        return ()


def _linen_model(label: str, module, variables, kwargs: Mapping, population: bool) -> Model:
    if not isinstance(variables, Mapping):
        raise ValueError(
            f"{label}: a linen model is (module, variables[, apply_kwargs]) with variables a mapping "
            f"such as {{'params': ...}}, got {type(variables).__name__}"
        )
    if not isinstance(kwargs, Mapping):
        raise ValueError(
            f"{label}: apply_kwargs must be a mapping (e.g. {{'train': False}}), got {type(kwargs).__name__}"
        )
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    kwargs = dict(kwargs)
    key_kwargs = _hashable(tuple(sorted(kwargs.items())))

    if _names_its_layers(module):

        def one(params, x):
            return OrderedDict(module.apply(params, x, capture="all", **kwargs)[1])
    else:

        def one(params, x):
            _, state = module.apply(params, x, capture_intermediates=True, mutable=["intermediates"], **kwargs)
            captured = _walk_linen(state.get("intermediates", {}))
            return unique(first_of_each([pair for path, calls in captured for pair in named_leaves(path, calls)]))

    capture = jax.vmap(one, in_axes=(0, None)) if population else one
    size = _population_size(variables, label) if population else None
    key = None if key_kwargs is None else ("linen", module, key_kwargs, population)
    return Model(label, type(module).__name__, variables, capture, population, size, key)


def _call_order(fn: Callable, *args) -> list[int]:
    """Index of the traced operation that computes each output of fn(*args): the call order."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    where = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for var in eqn.outvars:
            where[id(var)] = i
    return [where.get(id(var), -1) for var in jaxpr.outvars]


@contextlib.contextmanager
def _sow_order(nnx, log: list[tuple[int, str]]):
    """Records (id(module), name) of every `sow` while the block runs, in call-finish order
    (nnx.capture's method_outputs sow each method's output as the method returns)."""
    original = nnx.Module.sow

    def sow(self, variable_type, name, value, *args, **kwargs):
        log.append((id(self), name))
        return original(self, variable_type, name, value, *args, **kwargs)

    nnx.Module.sow = sow
    try:
        yield
    finally:
        nnx.Module.sow = original


def _nnx_model(label: str, module, population: bool) -> Model:
    from flax import nnx

    graphdef, state = nnx.split(module)

    def flat(state, x) -> list[tuple[int, str, Any]]:
        """(finish position, name, array) of every captured value, in flat_state (sorted path)
        order; the finish position is where the call that captured it returned."""
        copy = nnx.merge(graphdef, state)
        copy.eval()
        log: list[tuple[int, str]] = []
        with _sow_order(nnx, log):
            _, found = nnx.capture(copy, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
        paths = {id(m): tuple(p) for p, m in nnx.iter_modules(copy)}
        finished: dict[tuple, int] = {}
        for position, (owner, name) in enumerate(log):
            finished.setdefault(paths.get(owner, ()) + (name,), position)
        triples = []
        for path, var in nnx.to_flat_state(found):
            position = finished.get(tuple(path), len(log))
            triples += [(position, name, leaf) for name, leaf in named_leaves(tuple(path), var.get_value())]
        names = unique([(name, None) for _, name, _ in triples])
        return [(position, name, leaf) for (position, _, leaf), name in zip(triples, names, strict=True)]

    order: list[str] = []

    def one(state, x):
        triples = flat(state, x)
        if not order:  # first trace: order the layers by where the computation produces them
            index = _call_order(lambda s, x: [leaf for _, _, leaf in flat(s, x)], state, x)
            # ties (one value returned by several calls: a parent returning its last child's
            # output, eval-mode dropout passing its input on): the call that finished first
            rank = sorted(range(len(triples)), key=lambda i: (index[i], triples[i][0], i))
            order.extend(name for name, _ in first_of_each([triples[i][1:] for i in rank]))
        named = {name: leaf for _, name, leaf in triples}
        return OrderedDict((name, named[name]) for name in order)

    capture = jax.vmap(one, in_axes=(0, None)) if population else one
    size = _population_size(state, label) if population else None
    return Model(label, type(module).__name__, state, capture, population, size, ("nnx", graphdef, population))


def _callable_model(label: str, fn: Callable, population: bool) -> Model:
    def capture(params, x):
        acts = fn(x)
        if not isinstance(acts, Mapping):
            raise ValueError(
                f"{label}: a callable model must return a mapping name -> activation, got {type(acts).__name__}"
            )
        return OrderedDict((str(k), v) for k, v in acts.items())

    model = Model(label, getattr(fn, "__name__", type(fn).__name__), None, capture, population)
    model.is_function = True
    return model


def _is_linen(obj) -> bool:
    linen = sys.modules.get("flax.linen")
    return linen is not None and isinstance(obj, linen.Module)


def _is_nnx(obj) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def as_model(model, label: str, population: bool) -> Model:
    """A Flax linen pair, an NNX module or a callable -> Model; ValueError for anything else."""
    if isinstance(model, tuple) and model and _is_linen(model[0]):
        if len(model) not in (2, 3):
            raise ValueError(
                f"{label}: a linen model is (module, variables) or (module, variables, apply_kwargs), "
                f"got a tuple of {len(model)}"
            )
        return _linen_model(label, model[0], model[1], model[2] if len(model) == 3 else {}, population)
    if _is_linen(model):
        raise ValueError(f"{label}: a linen module needs its variables: pass ({type(model).__name__}(...), variables)")
    if _is_nnx(model):
        return _nnx_model(label, model, population)
    if callable(model) and not isinstance(model, type):
        return _callable_model(label, model, population)
    raise ValueError(
        f"{label}: unsupported model of type {type(model).__name__}; pass a (linen_module, variables) "
        "pair, an NNX module, a function x -> {name: activation}, or model_a=None with batches of "
        "activations"
    )
