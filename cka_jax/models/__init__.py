"""Flax (linen) ResNets of the study with every layer's representation exposed and removable blocks,
and Tiny-10 (Kornblith et al. 2019; `Tiny10`, layers conv1..conv8, pool, logits).

    model = CifarResNet(depth=14, width=1.0, residual=True, num_classes=10)
    variables = model.init(key, x)                     # {'params', 'batch_stats'}; x (B, H, W, C)
    logits = model.apply(variables, x)                 # eval-mode BN, (B, num_classes) float32
    logits, state = model.apply(variables, x, train=True, mutable=['batch_stats'])
    logits, reps = model.apply(variables, x, capture="blocks")
    logits = model.apply(variables, x, skip_blocks=("stage3/block2",))

Capture patterns (`capture=`; names in network order, returned as an OrderedDict name -> (B, ...)):
    "all"           every layer: ``stem``; per block ``conv1`` (and ``conv2`` in bottlenecks),
                    ``pre_residual`` (branch after its last BN, before the addition) and
                    ``post_residual`` (block output after the addition and ReLU); ``pool``; ``logits``.
    "blocks"        ``stem`` and every block's ``post_residual``.
    "pre_and_post"  ``stem`` and every block's ``pre_residual`` and ``post_residual``.
    a glob or name  e.g. ``"stage3/*/post_residual"``, ``"pool"``; a tuple of specs takes their union.
Block names are ``stage{i}/block{j}`` (1-based). A deleted block (`skip_blocks`) reports only its
``post_residual`` = ReLU(shortcut(x)). Representations have the model's compute `dtype`; logits
are float32. A pattern matching no layer, or an unknown block name, raises ValueError.

`train`, `capture` and `skip_blocks` are static Python values (strings, tuples): pass them to jit
as static arguments or close over them. Variables are plain pytrees, so a population is the
variables stacked on a leading model axis: ``jax.vmap(model.init, (0, None))(keys, x)`` and
``jax.vmap(lambda v, x: model.apply(v, x, capture="all"), (0, None))(variables, x)``; each model
keeps its own batch statistics. To shard the population over devices, wrap the vmapped function
in ``jax.shard_map(..., in_specs=P('pop'), ...)`` (or jit it on a mesh with ``AxisType.Auto``): jit
with NamedSharding on a mesh with explicit axes rejects the vmapped convolutions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cka_jax.models.capture import CAPTURE_PRESETS, CaptureSpec, check_capture, select_names
from cka_jax.models.cifar_resnet import CifarResNet
from cka_jax.models.imagenet_resnet import ImageNetResNet
from cka_jax.models.resnet import ResNetTrunk
from cka_jax.models.tiny10 import Tiny10

__all__ = [
    "CAPTURE_PRESETS",
    "MODELS",
    "CaptureSpec",
    "CifarResNet",
    "ImageNetResNet",
    "ResNetTrunk",
    "Tiny10",
    "create_model",
    "from_config",
    "representation_names",
    "representation_shapes",
]

#: The architectures a run config may name (its `model.name`).
MODELS: dict[str, type[ResNetTrunk]] = {
    "cifar_resnet": CifarResNet,
    "imagenet_resnet": ImageNetResNet,
    "tiny10": Tiny10,
}
#: Fields of a run config's `model` section that every architecture takes.
SHARED_CONFIG_FIELDS = ("residual", "zero_init_last_bn")


def create_model(name: str, *, num_classes: int, **kwargs) -> ResNetTrunk:
    """The model registered as `name` in `MODELS`, with the given fields.

    Args:
        name: "cifar_resnet" or "imagenet_resnet".
        num_classes: the classifier's outputs.
        **kwargs: the class's other fields (e.g. ``depth=20, width=1.0``).

    Returns:
        The Flax module (a `ResNetTrunk`).

    Raises:
        ValueError: an unknown name or an invalid architecture.

    Example:
        >>> from cka_jax.models import create_model
        >>> create_model("cifar_resnet", num_classes=10, depth=20).architecture()
        'ResNet-20 1×'
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {tuple(MODELS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def from_config(model_config: Any, num_classes: int) -> ResNetTrunk:
    """The model a run config's `model` section describes.

    Args:
        model_config: the section: `name` picks the class, which takes its own `config_fields`,
            the `SHARED_CONFIG_FIELDS` and the compute `dtype` (a name, e.g. "bfloat16").
        num_classes: the data set's classes.

    Returns:
        The Flax module (a `ResNetTrunk`).

    Raises:
        ValueError: an unknown name or an invalid architecture.
    """
    if model_config.name not in MODELS:
        raise ValueError(f"unknown model {model_config.name!r}; choose one of {tuple(MODELS)}")
    cls = MODELS[model_config.name]
    fields = {name: getattr(model_config, name) for name in (*cls.config_fields, *SHARED_CONFIG_FIELDS)}
    return cls(num_classes=num_classes, dtype=jnp.dtype(model_config.dtype), **fields)


def representation_names(
    model: ResNetTrunk, capture: CaptureSpec = "blocks", skip_blocks: str | Iterable[str] = ()
) -> tuple[str, ...]:
    """Names of the representations ``model.apply(..., capture=capture, skip_blocks=skip_blocks)`` returns.

    Computed without running the model (they do not depend on the input shape).

    Args:
        model: a `ResNetTrunk`.
        capture: a capture spec (see `ResNetTrunk`).
        skip_blocks: deleted blocks, whose only representation is their ``post_residual``.

    Returns:
        The names, in network order.

    Raises:
        ValueError: a pattern matching no layer, or an unknown block name.

    Example:
        >>> from cka_jax.models import CifarResNet, representation_names
        >>> representation_names(CifarResNet(depth=8), "blocks")
        ('stem', 'stage1/block1/post_residual', 'stage2/block1/post_residual', 'stage3/block1/post_residual')
    """
    check_capture(capture, model.layer_names())
    return select_names(capture, model.layer_names(skip_blocks))


def representation_shapes(
    model: ResNetTrunk,
    input_shape: Sequence[int],
    capture: CaptureSpec = "blocks",
    skip_blocks: str | Iterable[str] = (),
) -> OrderedDict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of each representation for inputs of `input_shape`, via `jax.eval_shape`.

    No computation runs.

    Args:
        model: a `ResNetTrunk`.
        input_shape: (B, H, W, C).
        capture: a capture spec (see `ResNetTrunk`).
        skip_blocks: deleted blocks.

    Returns:
        An OrderedDict name -> `jax.ShapeDtypeStruct`, in network order.

    Raises:
        ValueError: a pattern matching no layer, or an unknown block name.
    """

    def init_and_capture():
        x = jnp.zeros(tuple(input_shape), jnp.float32)
        variables = model.init(jax.random.key(0), x)
        return model.apply(variables, x, capture=capture, skip_blocks=skip_blocks)[1]

    return jax.eval_shape(init_and_capture)
