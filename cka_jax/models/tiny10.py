"""Tiny-10 (Kornblith et al. 2019, Table 2's layer-identification network), for any input channels.

conv16-BN-ReLU ×2, conv32 stride 2, conv32 ×2, conv64 stride 2, conv64 valid padding, 1×1 conv64,
global average pool, dense logits; every conv 3×3 with BN and ReLU unless noted. Channels scale
with the width multiplier (round(16k), round(32k), round(64k)).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from cka_jax.models import capture as capture_lib
from cka_jax.models.layers import BasicBlock, Taps, classifier_head, conv_factory, norm_factory
from cka_jax.models.resnet import ResNetTrunk, check_images, check_positive_int, check_width, scaled_channels

# (base channels, kernel, stride, padding) of the eight convolutions, in network order.
CONVS: tuple[tuple[int, int, int, str], ...] = (
    (16, 3, 1, "SAME"),
    (16, 3, 1, "SAME"),
    (32, 3, 2, "SAME"),
    (32, 3, 1, "SAME"),
    (32, 3, 1, "SAME"),
    (64, 3, 2, "SAME"),
    (64, 3, 1, "VALID"),
    (64, 1, 1, "SAME"),
)
LAYERS: tuple[str, ...] = (*(f"conv{i}" for i in range(1, len(CONVS) + 1)), "pool", "logits")


class Tiny10(ResNetTrunk):
    """Tiny-10 for (B, H, W, C) input (H, W >= 9) -> (B, num_classes) logits.

    Layers (`capture` names): ``conv1`` ... ``conv8`` (each after its BN and ReLU), ``pool``,
    ``logits``; the paper's 9 layers are all but ``logits``. It has no residual blocks:
    ``residual`` must be False and `skip_blocks` empty.
    """

    width: float = 1.0
    residual: bool = False
    num_classes: int = 10
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32

    block_cls: ClassVar[type[nn.Module]] = BasicBlock  # unused: no residual blocks
    config_fields = ("width",)

    def architecture(self) -> str:
        return "Tiny-10" + ("" if self.width == 1 else f" {self.width:g}×")

    def __post_init__(self) -> None:
        check_width("width", self.width)
        check_positive_int("num_classes", self.num_classes)
        scaled_channels(16, self.width, "width")
        if self.residual is not False:
            raise ValueError("tiny10 has no skip connections: set model.residual=False")
        super().__post_init__()

    def stages(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (), ()

    def block_names(self) -> tuple[str, ...]:
        return ()

    def layer_names(self, skip_blocks: str | Iterable[str] = ()) -> tuple[str, ...]:
        capture_lib.check_skip_blocks(skip_blocks, (), False)
        return LAYERS

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
        capture_lib.check_skip_blocks(skip_blocks, (), False)
        if capture is not None:
            capture_lib.check_capture(capture, LAYERS)
        conv, norm = conv_factory(self.dtype), norm_factory(train, self.dtype)
        acts: Taps = OrderedDict()
        x = jnp.asarray(x, self.dtype)
        for i, (channels, kernel, stride, padding) in enumerate(CONVS, 1):
            c = scaled_channels(channels, self.width, "width")
            x = conv(c, (kernel, kernel), stride, padding=padding, name=f"conv{i}")(x)
            acts[f"conv{i}"] = x = nn.relu(norm(name=f"bn{i}")(x))
        logits = classifier_head(x, acts, self.num_classes, self.dtype)
        return logits if capture is None else (logits, capture_lib.select(capture, acts))
