"""CIFAR ResNet v1 of depth 6n+2 and width multiplier k (He et al. 2016; Keras resnet_cifar)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cka_jax.models.layers import BasicBlock, ModuleDef
from cka_jax.models.resnet import ResNetTrunk, check_positive_int, check_width, scaled_channels


class CifarResNet(ResNetTrunk):
    """ResNet-(6n+2) with width multiplier k, for any (B, H, W, C) input -> (B, num_classes) logits.

    Stem conv3×3-BN-ReLU with round(16k) channels, three stages of n basic blocks with round(16k),
    round(32k), round(64k) channels (stride 2 and a 1×1 conv+BN projection shortcut at the start
    of stages 2 and 3), global average pool, dense classifier. Layers are named ``stem``,
    ``stage{1..3}/block{1..n}/{conv1, pre_residual, post_residual}``, ``pool``, ``logits``. Called
    as described in `ResNetTrunk`.

    Attributes:
        depth: 6n+2 (8, 14, 20, 26, 38, 56, 62, 110, 164, ...).
        width: the width multiplier k, any positive number leaving at least one channel.
        residual: False drops every skip connection.
        num_classes: the classifier's outputs.
        zero_init_last_bn: initialise each block's last BatchNorm scale to zero.
        dtype: the compute dtype (e.g. ``jnp.bfloat16``); parameters, BatchNorm statistics and
            logits stay float32.

    Raises:
        ValueError: on construction, a depth that is not 6n+2 with n ≥ 1, a width leaving no channel,
            or num_classes < 1.

    References:
        He, Zhang, Ren & Sun, *Deep Residual Learning for Image Recognition*, CVPR 2016.

    Example:
        >>> from cka_jax.models import CifarResNet
        >>> model = CifarResNet(depth=14, width=2.0)
        >>> model.architecture(), model.stages()
        ('ResNet-14 2×', ((2, 2, 2), (32, 64, 128)))
    """

    depth: int = 14
    width: float = 1.0
    residual: bool = True
    num_classes: int = 10
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32

    block_cls = BasicBlock
    config_fields = ("depth", "width")  # the fields of a run config's `model` section it takes

    def architecture(self) -> str:
        """A short name of the architecture, e.g. 'ResNet-14 2×'."""
        return f"ResNet-{self.depth} {self.width:g}×"

    def __post_init__(self) -> None:
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(
                f"depth must be 6n+2 with n >= 1 (8, 14, 20, 26, 32, 38, 44, 56, 62, 110, 164, ...), got {self.depth!r}"
            )
        check_width("width", self.width)
        check_positive_int("num_classes", self.num_classes)
        scaled_channels(16, self.width, "width")
        super().__post_init__()

    def stages(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(blocks per stage, block filters per stage)."""
        n = (self.depth - 2) // 6
        return (n, n, n), tuple(scaled_channels(c, self.width, "width") for c in (16, 32, 64))

    def stem(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef) -> jax.Array:
        """The stem, conv3×3-BN-ReLU (an architecture hook of `ResNetTrunk`)."""
        x = conv(scaled_channels(16, self.width, "width"), (3, 3), name="stem_conv")(x)
        return nn.relu(norm(name="stem_bn")(x))
