"""The training run's configuration: every field with its default, and validation.

Config files in ``configs/`` start from :func:`base_config` and change fields; a field that
is not here is an error (:func:`validate_config`), so typos never pass silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from cka_jax import models
from cka_jax.data import datasets as data

DTYPES = ("float32", "bfloat16")
STRATEGY_NAMES = ("auto", "vmap", "loop")

# Fields that may change between an interrupted run and its resumption: they change how the
# run executes or is kept, never what it computes.
RESUMABLE_FIELDS = frozenset(
    {
        "population.strategy",
        "checkpoint.every_steps",
        "checkpoint.max_to_keep",
        "train.eval_batch_size",
        "data.num_workers",
    }
)


class RunConfigError(ValueError):
    """The run cannot start or be read: bad config, architecture, layout or workdir (nothing was done)."""


def base_config() -> ml_collections.ConfigDict:
    """All fields of a run with their defaults (digits, ResNet-14 1x, 4 seeds), locked: setting a
    field that does not exist raises ``AttributeError`` naming it."""
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # digits | fashion_mnist | cifar10 | cifar100 | imagenet2012
    c.data.fraction = 1.0  # fraction of the training set, subset drawn from data.seed
    c.data.seed = 0  # seed of the subset, the digits split and random labels
    c.data.random_labels = False  # replace training labels by uniform random ones
    c.data.crop_padding = 4  # reflect-pad then random crop back (0: no crop)
    c.data.flip = True  # random horizontal flip
    c.data.image_size = 224  # streamed data sets (imagenet2012) only
    c.data.data_dir = ""  # where the data set is read: used or refused, never replaced ("": its default places)
    c.data.num_workers = 8  # host threads decoding streamed data

    c.model = ml_collections.ConfigDict()
    c.model.name = "cifar_resnet"  # cifar_resnet | imagenet_resnet | tiny10
    c.model.depth = 14  # cifar_resnet: 6n+2
    c.model.width = 1.0  # cifar_resnet, tiny10: width multiplier
    c.model.residual = True  # tiny10: must be False
    c.model.stage_sizes = (3, 4, 6, 3)  # imagenet_resnet
    c.model.stage_widths = (1.0, 1.0, 1.0, 1.0)  # imagenet_resnet
    c.model.zero_init_last_bn = False
    c.model.dtype = "float32"  # activations; params and BatchNorm stats stay float32

    c.population = ml_collections.ConfigDict()
    c.population.size = 4  # M models, one init seed each
    c.population.seed = 0  # model m uses seed (population.seed, m)
    c.population.shared_data_order = False  # True: all models see the same batches/augmentation
    # How one device steps its models: "auto" (measured at the start, see train/strategy_tuning.py),
    # "loop" (one per call), "vmap" (all in one call) or a number of models per call such as "4"
    # (a divisor of the models per device; a string, as --config.population.strategy=4 gives).
    c.population.strategy = "auto"

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 40
    c.train.batch_size = 128  # per model
    c.train.learning_rate = 0.1  # peak, after warmup; cosine decay to 0
    c.train.warmup_epochs = 0.0
    c.train.momentum = 0.9
    c.train.nesterov = False
    c.train.weight_decay = 1e-4  # L2 on conv/dense kernels, added to the loss
    c.train.label_smoothing = 0.0
    c.train.eval_every_epochs = 1
    c.train.eval_batch_size = 500
    c.train.prediction_dtype = "float32"  # dtype of predictions/test.npz logits

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0  # 0: at the end of every epoch
    c.checkpoint.max_to_keep = 2  # latest checkpoints kept, besides the milestones
    c.checkpoint.keep_at_fractions = (0.0, 0.35, 0.75, 1.0)  # milestones kept forever
    c.lock()  # a field that is not here is refused, by name, wherever it is set
    return c


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat_keys(value, name + "."))
        else:
            out[name] = value
    return out


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{'train.epochs': 40, ...}``: the config's leaves by dotted name, JSON-ready."""
    return json.loads(json.dumps(_flat_keys(config)))


def config_from_flat(flat: dict[str, Any]) -> ml_collections.ConfigDict:
    """Inverse of :func:`flat_config` (e.g. a workdir's config.json) over :func:`base_config`.

    Raises ``ValueError`` for anything :func:`flat_config` cannot have written: not an object,
    an unknown field, a value of the wrong kind.
    """
    if not isinstance(flat, dict):
        raise ValueError(f"a config is a JSON object of fields, not a JSON {type(flat).__name__}")
    config = base_config()
    unknown = sorted(set(flat) - set(_flat_keys(config)))
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(map(repr, unknown))}")
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        try:
            node[leaf] = tuple(value) if isinstance(value, list) else value
        except TypeError as error:
            raise ValueError(f"{name}: {value!r} is not a valid value ({error})") from error
    return config


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a valid JSON number")


def read_flat_config(path: str) -> dict[str, Any]:
    """A saved flat config (config.json). ``ValueError`` saying why the file is not one
    (unparseable, NaN/Infinity, not an object, unknown fields, wrong kinds); ``OSError`` if unreadable.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        flat = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as error:  # also UnicodeDecodeError
        raise ValueError(f"not valid JSON ({error})") from error
    config_from_flat(flat)
    return flat


def _interval(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> tuple[Callable[[float], bool], str]:
    """(predicate, text) of a numeric range, e.g. ``_interval(0, 1, low_open=True)`` is "in (0, 1]"."""

    def inside(v: float) -> bool:
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    if high is None:
        return inside, f"{'>' if low_open else '>='} {low}"
    return inside, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


SEED_RANGE = _interval(0, 2**32, high_open=True)  # jax.random.PRNGKey(2**32) equals PRNGKey(0)
# The allowed range of every numeric field (each also has its type, from base_config, and must be
# finite). Tuples list the range of their elements.
NUMERIC_RANGES = {
    "data.fraction": _interval(0, 1, low_open=True),
    "data.seed": SEED_RANGE,
    "data.crop_padding": _interval(0),
    "data.image_size": _interval(1),
    "data.num_workers": _interval(1),
    "model.depth": _interval(1),
    "model.width": _interval(0, low_open=True),
    "model.stage_sizes": _interval(1),
    "model.stage_widths": _interval(0, low_open=True),
    "population.size": _interval(1),
    "population.seed": SEED_RANGE,
    "train.epochs": _interval(1),
    "train.batch_size": _interval(1),
    "train.learning_rate": _interval(0, low_open=True),
    "train.warmup_epochs": _interval(0),
    "train.momentum": _interval(0, 1, high_open=True),
    "train.weight_decay": _interval(0),
    "train.label_smoothing": _interval(0, 1, high_open=True),
    "train.eval_every_epochs": _interval(1),
    "train.eval_batch_size": _interval(1),
    "checkpoint.every_steps": _interval(0),
    "checkpoint.max_to_keep": _interval(1),
    "checkpoint.keep_at_fractions": _interval(0, 1),
}
# Fields that take one of a few names: (what the name is, the choices).
CHOICES = {
    "data.name": ("data set", tuple(data.DATASETS)),
    "model.name": ("model", tuple(models.MODELS)),
    "model.dtype": ("dtype", DTYPES),
    "train.prediction_dtype": ("dtype", ("float32", "float16")),
}


def _type_error(name: str, value: Any, default: Any) -> str | None:
    """Why ``value`` cannot stand for a field whose default is ``default`` (None if it can)."""
    if isinstance(default, tuple):
        if not isinstance(value, tuple) or not value:
            return f"{name} must be a non-empty tuple, got {value!r}"
        problems = (_type_error(f"{name}[{i}]", v, default[0]) for i, v in enumerate(value))
        return next((p for p in problems if p), None)
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        kind = "a finite number"
    else:
        ok, kind = isinstance(value, str), "a string"
    return None if ok else f"{name} must be {kind}, got {value!r}"


@dataclasses.dataclass(frozen=True)
class Strategy:
    """``population.strategy`` parsed (:meth:`parse`): how one device steps its models.

    ``auto`` measures at the start which chunk size is fastest (cka_jax/train/strategy_tuning.py),
    ``loop`` steps one model per call, ``vmap`` all of them in one call, and a chunk size c steps c
    models per call (a divisor of the models per device, checked with the layout).
    """

    name: str  # "auto", "vmap", "loop" or "chunk"
    chunk_size: int = 0  # c, for name == "chunk"

    @classmethod
    def parse(cls, text: str) -> Strategy:
        """The strategy ``text`` names (``'auto'``, ``'vmap'``, ``'loop'`` or a chunk size in decimal,
        as ``--config.population.strategy=4`` gives it). ``ValueError`` (one line) for anything else."""
        if text in STRATEGY_NAMES:
            return cls(text)
        if isinstance(text, str) and re.fullmatch(r"[0-9]+", text) and int(text) >= 1:
            return cls("chunk", int(text))
        raise ValueError(
            "population.strategy must be auto, vmap, loop or a number of models per call "
            f"(a positive integer such as '4'), got {text!r}"
        )

    def __str__(self) -> str:
        return str(self.chunk_size) if self.name == "chunk" else self.name


def _strategy_error(value: str) -> str | None:
    """Why ``value`` is no ``population.strategy`` (its divisibility is checked with the layout)."""
    try:
        Strategy.parse(value)
    except ValueError as error:
        return str(error)
    return None


def _range_error(name: str, value: Any) -> str | None:
    if name == "population.strategy":
        return _strategy_error(value)
    if name in CHOICES and value not in CHOICES[name][1]:
        what, choices = CHOICES[name]
        return f"unknown {what} {value!r} ({name}: choose from {', '.join(choices)})"
    if name not in NUMERIC_RANGES:
        return None
    inside, text = NUMERIC_RANGES[name]
    values = value if isinstance(value, tuple) else (value,)
    bad = [v for v in values if not inside(v)]
    return f"{name} must be {text}, got {value!r}" if bad else None


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` naming every unknown field, wrong type or out-of-range value in ``config``.

    Every field has the type of its default in :func:`base_config` (an int field refuses 2.5,
    True or "abc"; a float field refuses nan and inf) and numeric fields lie in
    :data:`NUMERIC_RANGES`.
    """
    known = _flat_keys(base_config())
    given = _flat_keys(config)
    errors = [f"unknown config field '{k}'" for k in sorted(set(given) - set(known))]
    errors += [f"missing config field '{k}'" for k in sorted(set(known) - set(given))]
    if errors:
        raise ValueError("; ".join(errors) + f". Known fields: {', '.join(sorted(known))}")
    for name, default in known.items():
        error = _type_error(name, given[name], default) or _range_error(name, given[name])
        if error:
            errors.append(error)
    t = config.train
    if not errors and t.warmup_epochs > t.epochs:
        errors.append(f"train.warmup_epochs ({t.warmup_epochs}) must not exceed train.epochs ({t.epochs})")
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))


def build_model(config: ml_collections.ConfigDict) -> models.ResNetTrunk:
    """The configured model, with one output per class of the data set; ``ValueError`` for an
    invalid architecture."""
    return models.from_config(config.model, data.dataset(config.data.name).num_classes)


def config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """Fields (outside :data:`RESUMABLE_FIELDS`) where ``config`` differs from a saved flat config."""
    current = flat_config(config)
    names = sorted((set(saved) | set(current)) - RESUMABLE_FIELDS)
    return [
        f"{n}: {saved.get(n, '<absent>')!r} in the workdir, {current.get(n, '<absent>')!r} now"
        for n in names
        if saved.get(n) != current.get(n)
    ]
