"""The forward pass shared by the CIFAR and ImageNet ResNets: stem, residual stages, classifier,
representation capture and block deletion."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from cka_jax.models import capture as capture_lib
from cka_jax.models.layers import (
    ModuleDef,
    Taps,
    block_names,
    classifier_head,
    conv_factory,
    layer_names,
    norm_factory,
    residual_stages,
)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_width(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_images(x: jax.Array) -> None:
    """ValueError unless `x` is a batch of images, (batch, height, width, channels)."""
    if x.ndim != 4:
        raise ValueError(f"input must be (batch, height, width, channels), got shape {x.shape}")


def scaled_channels(base: int, multiplier: float, what: str) -> int:
    """round(base · multiplier), ValueError when that leaves no channel."""
    channels = round(base * multiplier)
    if channels < 1:
        raise ValueError(
            f"{what}: width multiplier {multiplier!r} gives round({base}·{multiplier}) = {channels} "
            "channels; it must give at least 1"
        )
    return channels


class ResNetTrunk(nn.Module):
    """Base of the ResNets: stem, residual stages, classifier, representation capture, block deletion.

    Subclasses define the fields used here (``residual``, ``num_classes``, ``zero_init_last_bn``,
    ``dtype``), ``block_cls``, ``config_fields`` and the architecture hooks `stages`, `stem` and
    `architecture`. A model is called through ``model.apply(variables, x, *, train=False,
    capture=None, skip_blocks=())``:

    - x: (B, H, W, C) images.
    - train: train-mode BatchNorm (pass ``mutable=["batch_stats"]``).
    - capture: a preset (``"all"``, ``"blocks"``, ``"pre_and_post"``), a glob over layer names
      (``"stage3/*/post_residual"``), a name, or a tuple of those (`CAPTURE_PRESETS`).
    - skip_blocks: names of blocks (``"stage3/block2"``) whose residual branches are deleted,
      keeping their shortcuts.

    It returns float32 logits (B, num_classes); with `capture`, ``(logits, reps)``, reps an
    OrderedDict name -> activation (B, ...) in network order. A pattern matching no layer, or an
    unknown block name, raises ValueError.
    """

    block_cls: ClassVar[type[nn.Module]]
    config_fields: ClassVar[tuple[str, ...]]  # fields of a run config's `model` section it takes

    def architecture(self) -> str:
        """A short name of the architecture for reports (e.g. 'ResNet-14 2×')."""
        raise NotImplementedError

    def stages(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(blocks per stage, block filters per stage)."""
        raise NotImplementedError

    def stem(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef) -> jax.Array:
        """The stem applied to the input (an architecture hook)."""
        raise NotImplementedError

    def block_names(self) -> tuple[str, ...]:
        """Names of the residual blocks (valid `skip_blocks` entries), network order."""
        return block_names(self.stages()[0])

    def layer_names(self, skip_blocks: str | Iterable[str] = ()) -> tuple[str, ...]:
        """Names of all layers `capture="all"` returns, network order."""
        skip = capture_lib.check_skip_blocks(skip_blocks, self.block_names(), self.residual)
        return layer_names(self.stages()[0], self.block_cls.TAPS, skip)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        capture: capture_lib.CaptureSpec | None = None,
        skip_blocks: str | Iterable[str] = (),
    ) -> jax.Array | tuple[jax.Array, Taps]:
        check_images(x)
        skip = capture_lib.check_skip_blocks(skip_blocks, self.block_names(), self.residual)
        if capture is not None:
            capture_lib.check_capture(capture, self.layer_names())
        conv, norm = conv_factory(self.dtype), norm_factory(train, self.dtype)
        acts: Taps = OrderedDict()
        acts["stem"] = x = self.stem(jnp.asarray(x, self.dtype), conv, norm)
        stage_sizes, stage_filters = self.stages()
        x = residual_stages(
            x,
            acts,
            block_cls=self.block_cls,
            stage_sizes=stage_sizes,
            stage_filters=stage_filters,
            skip=skip,
            conv=conv,
            norm=norm,
            residual=self.residual,
            zero_init_last_bn=self.zero_init_last_bn,
        )
        logits = classifier_head(x, acts, self.num_classes, self.dtype)
        return logits if capture is None else (logits, capture_lib.select(capture, acts))
