"""ImageNet ResNet v1.5 with bottleneck blocks and per-stage depth and width multipliers.

ResNet-50 is ``stage_sizes=(3, 4, 6, 3)``; the paper's deeper variant adds blocks to stage 3
(e.g. ``(3, 4, 17, 3)``), its wider variant widens stage 3 (``stage_widths=(1, 1, 2.8, 1)``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cka_jax.models.layers import BottleneckBlock, ModuleDef
from cka_jax.models.resnet import ResNetTrunk, check_positive_int, check_width, scaled_channels


class ImageNetResNet(ResNetTrunk):
    """Bottleneck ResNet (v1.5) for (B, H, W, C) input -> (B, num_classes) logits.

    Stem conv7×7/2-BN-ReLU with `num_filters` channels and max-pool 3×3/2; stage i has
    stage_sizes[i] bottleneck blocks of width round(num_filters·2^i·stage_widths[i]) (output 4×
    that), stride 2 on the 3×3 conv of the first block of stages 2+, and a 1×1 conv+BN projection
    shortcut on each stage's first block; global average pool, dense classifier. Layers are named
    ``stem``, ``stage{i}/block{j}/{conv1, conv2, pre_residual, post_residual}``, ``pool``,
    ``logits``. ResNet-50 (25,557,032 parameters) is the default; the paper's deeper variant adds
    blocks to stage 3 (``(3, 4, 17, 3)``), its wider variant widens stage 3
    (``stage_widths=(1, 1, 2.8, 1)``).

    Attributes:
        stage_sizes: blocks per stage, each ≥ 1.
        stage_widths: one width multiplier per stage.
        num_classes: the classifier's outputs.
        num_filters: the stem's channels.
        residual: False drops every skip connection.
        zero_init_last_bn: initialise each block's last BatchNorm scale to zero.
        dtype: the compute dtype; parameters, BatchNorm statistics and logits stay float32.

    Raises:
        ValueError: on construction, no stage, a stage size below 1, a width per stage missing or
            leaving no channel.

    References:
        He, Zhang, Ren & Sun, *Deep Residual Learning for Image Recognition*, CVPR 2016.
    """

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    stage_widths: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    num_classes: int = 1000
    num_filters: int = 64
    residual: bool = True
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32

    block_cls = BottleneckBlock
    config_fields = ("stage_sizes", "stage_widths")  # the fields of a run config's `model` section it takes

    def architecture(self) -> str:
        """A short name, e.g. 'ResNet stages 3-4-6-3 widths 1.0-1.0-2.8-1.0'."""
        return f"ResNet stages {'-'.join(map(str, self.stage_sizes))} widths {'-'.join(map(str, self.stage_widths))}"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_sizes", tuple(self.stage_sizes))
        object.__setattr__(self, "stage_widths", tuple(self.stage_widths))
        if not self.stage_sizes:
            raise ValueError("stage_sizes must name at least one stage, got ()")
        for i, size in enumerate(self.stage_sizes):
            check_positive_int(f"stage_sizes[{i}]", size)
        if len(self.stage_widths) != len(self.stage_sizes):
            raise ValueError(
                f"stage_widths needs one multiplier per stage ({len(self.stage_sizes)}), got {self.stage_widths!r}"
            )
        for i, width in enumerate(self.stage_widths):
            check_width(f"stage_widths[{i}]", width)
        check_positive_int("num_filters", self.num_filters)
        check_positive_int("num_classes", self.num_classes)
        self.stages()
        super().__post_init__()

    def stages(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(blocks per stage, block filters per stage)."""
        filters = tuple(
            scaled_channels(self.num_filters * 2**i, w, f"stage_widths[{i}]") for i, w in enumerate(self.stage_widths)
        )
        return self.stage_sizes, filters

    def stem(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef) -> jax.Array:
        """The stem, conv7×7/2-BN-ReLU and max-pool (an architecture hook of `ResNetTrunk`)."""
        x = conv(self.num_filters, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
