"""What the config files share (imported as ``configs.common``; train.py's directory, the
repository root, is on ``sys.path``): big_vision-style ``path.py:arg`` arguments and the paper's
CIFAR recipe, which cifar10, cifar100, fashion_mnist and paper_pairs start from.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from cka_jax.workdir.config import base_config

CIFAR_ARGS = dict(depth=14, width=1.0, residual=True, fraction=1.0, size=1, seed=0, epochs=300, random_labels=False)


def cifar_recipe(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
    """The paper's CIFAR recipe (SGD 0.9, cosine, L2 1e-4, batch 128, 300 epochs) on ``dataset``,
    with :data:`CIFAR_ARGS` given in ``arg`` (``'depth=62,width=2'``)."""
    a = parse_arg(arg, CIFAR_ARGS)
    c = base_config()
    c.data.name = dataset
    c.data.fraction = a["fraction"]
    c.data.random_labels = a["random_labels"]
    c.data.crop_padding = 4
    c.data.flip = True
    c.model.name = "cifar_resnet"
    c.model.depth = a["depth"]
    c.model.width = a["width"]
    c.model.residual = a["residual"]
    c.population.size = a["size"]
    c.population.seed = a["seed"]
    c.train.epochs = a["epochs"]
    c.train.batch_size = 128
    c.train.learning_rate = 0.1
    c.train.weight_decay = 1e-4
    c.train.eval_batch_size = 1000
    return c


def parse_arg(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """big_vision-style config argument ``'depth=62,width=2'`` → typed dict over ``defaults``."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"bad config argument '{item}'; expected key=value with key in {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key} must be true/false, got '{raw}'")
            values[key] = raw.lower() in ("true", "1")
            continue
        try:
            values[key] = kind(raw)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise ValueError(f"config argument {key} must be {what}, got '{raw}'") from None
    return values
