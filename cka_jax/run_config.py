"""The training run's configuration: every field with its default, and validation.

Config files in ``configs/`` start from :func:`base_config` and change fields; a field that
is not here is an error (:func:`validate_config`), so typos never pass silently.
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections

DATASETS = ("digits", "cifar10", "cifar100", "imagenet2012")
MODELS = ("cifar_resnet", "imagenet_resnet")
STRATEGIES = ("auto", "vmap", "loop")
DTYPES = ("float32", "bfloat16")

# Fields that may change between an interrupted run and its resumption: they change how the
# run executes or is kept, never what it computes.
RESUMABLE_FIELDS = frozenset({
    "population.strategy",
    "checkpoint.every_steps",
    "checkpoint.max_to_keep",
    "train.eval_batch_size",
    "data.num_workers",
})


def base_config() -> ml_collections.ConfigDict:
    """All fields of a run with their defaults (digits, ResNet-14 1x, 4 seeds)."""
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"            # digits | cifar10 | cifar100 | imagenet2012
    c.data.fraction = 1.0             # fraction of the training set, subset drawn from data.seed
    c.data.seed = 0                   # seed of the subset, the digits split and random labels
    c.data.random_labels = False      # replace training labels by uniform random ones
    c.data.crop_padding = 4           # reflect-pad then random crop back (0: no crop)
    c.data.flip = True                # random horizontal flip
    c.data.image_size = 224           # streamed data sets (imagenet2012) only
    c.data.data_dir = ""              # tensorflow-datasets data_dir ("" : tfds default)
    c.data.num_workers = 8            # host threads decoding streamed data

    c.model = ml_collections.ConfigDict()
    c.model.name = "cifar_resnet"     # cifar_resnet | imagenet_resnet
    c.model.depth = 14                # cifar_resnet: 6n+2
    c.model.width = 1.0               # cifar_resnet: width multiplier
    c.model.residual = True
    c.model.stage_sizes = (3, 4, 6, 3)          # imagenet_resnet
    c.model.stage_widths = (1.0, 1.0, 1.0, 1.0)  # imagenet_resnet
    c.model.zero_init_last_bn = False
    c.model.dtype = "float32"         # activations; params and BatchNorm stats stay float32

    c.population = ml_collections.ConfigDict()
    c.population.size = 4             # M models, one init seed each
    c.population.seed = 0             # model m uses seed (population.seed, m)
    c.population.shared_data_order = False  # True: all models see the same batches/augmentation
    c.population.strategy = "auto"    # auto | vmap | loop: how one device runs its models

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 40
    c.train.batch_size = 128          # per model
    c.train.learning_rate = 0.1       # peak, after warmup; cosine decay to 0
    c.train.warmup_epochs = 0.0
    c.train.momentum = 0.9
    c.train.nesterov = False
    c.train.weight_decay = 1e-4       # L2 on conv/dense kernels, added to the loss
    c.train.label_smoothing = 0.0
    c.train.eval_every_epochs = 1
    c.train.eval_batch_size = 500
    c.train.prediction_dtype = "float32"   # dtype of predictions/test.npz logits

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0      # 0: at the end of every epoch
    c.checkpoint.max_to_keep = 2      # latest checkpoints kept, besides the milestones
    c.checkpoint.keep_at_fractions = (0.0, 0.35, 0.75, 1.0)  # milestones kept forever
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
    """Inverse of :func:`flat_config` (e.g. a workdir's config.json) over :func:`base_config`."""
    config = base_config()
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` naming every unknown field or out-of-range value in ``config``."""
    known = _flat_keys(base_config())
    given = _flat_keys(config)
    errors = [f"unknown config field '{k}'" for k in sorted(set(given) - set(known))]
    errors += [f"missing config field '{k}'" for k in sorted(set(known) - set(given))]
    if errors:
        raise ValueError("; ".join(errors) + f". Known fields: {', '.join(sorted(known))}")

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    d, m, p, t, ck = config.data, config.model, config.population, config.train, config.checkpoint
    check(d.name in DATASETS, f"unknown data set '{d.name}' (choose from {', '.join(DATASETS)})")
    check(0.0 < d.fraction <= 1.0, f"data.fraction must be in (0, 1], got {d.fraction}")
    check(d.crop_padding >= 0, "data.crop_padding must be >= 0")
    check(m.name in MODELS, f"unknown model '{m.name}' (choose from {', '.join(MODELS)})")
    check(m.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got '{m.dtype}'")
    check(p.size >= 1, f"population.size must be >= 1, got {p.size}")
    check(p.strategy in STRATEGIES, f"population.strategy must be one of {STRATEGIES}")
    check(t.epochs >= 1, "train.epochs must be >= 1")
    check(t.batch_size >= 1, "train.batch_size must be >= 1")
    check(t.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
    check(t.learning_rate > 0, "train.learning_rate must be > 0")
    check(t.warmup_epochs >= 0, "train.warmup_epochs must be >= 0")
    check(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)")
    check(t.eval_every_epochs >= 1, "train.eval_every_epochs must be >= 1")
    check(t.prediction_dtype in ("float32", "float16"), "train.prediction_dtype: float32|float16")
    check(ck.every_steps >= 0 and ck.max_to_keep >= 1, "checkpoint.every_steps >= 0, max_to_keep >= 1")
    check(all(0.0 <= f <= 1.0 for f in ck.keep_at_fractions),
          "checkpoint.keep_at_fractions must lie in [0, 1]")
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))


def config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """Fields (outside :data:`RESUMABLE_FIELDS`) where ``config`` differs from a saved flat config."""
    current = flat_config(config)
    names = sorted((set(saved) | set(current)) - RESUMABLE_FIELDS)
    return [f"{n}: {saved.get(n, '<absent>')!r} in the workdir, {current.get(n, '<absent>')!r} now"
            for n in names if saved.get(n) != current.get(n)]


def parse_arg(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """big_vision-style config argument ``'depth=62,width=2'`` → typed dict over ``defaults``."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"bad config argument '{item}'; expected key=value with key in "
                             f"{sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key} must be true/false, got '{raw}'")
            values[key] = raw.lower() in ("true", "1")
        else:
            values[key] = kind(raw)
    return values
