"""Building blocks shared by the ResNets: conv/BN factories and residual blocks that report
their inner activations.

Every block returns ``(output, taps)``, ``taps`` an OrderedDict from a local layer name
(``conv1``, ``conv2``, ``pre_residual``, ``post_residual``) to its activation, in network order.
A deleted block (``skip=True``) returns ``act(shortcut(x))`` and reports only ``post_residual``.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any
Taps = OrderedDict[str, jax.Array]

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv_factory(dtype: Any) -> ModuleDef:
    """Bias-free convolution, He-normal init, float32 parameters, `dtype` compute."""
    return functools.partial(
        nn.Conv, use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.he_normal()
    )


def norm_factory(train: bool, dtype: Any) -> ModuleDef:
    """BatchNorm on batch statistics when `train`, else on the running averages."""
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


class ProjectionShortcut(nn.Module):
    """1×1 strided conv + BN, mapping (B, H, W, C) to (B, H/s, W/s, filters)."""

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(self.filters, (1, 1), self.strides, name="conv")(x)
        return self.norm(name="bn")(x)


def _needs_projection(x: jax.Array, filters: int, strides: int) -> bool:
    return strides != 1 or x.shape[-1] != filters


def _close_block(
    block: nn.Module, x: jax.Array, branch: jax.Array | None, filters: int, taps: Taps
) -> tuple[jax.Array, Taps]:
    """Adds the shortcut (if residual) to `branch`, or keeps only the shortcut when the branch was
    deleted (``branch is None``), then applies the activation."""
    if block.residual:
        shortcut = x
        if _needs_projection(x, filters, block.strides):
            shortcut = ProjectionShortcut(filters, block.strides, block.conv, block.norm, name="shortcut")(x)
        y = shortcut if branch is None else shortcut + branch
    else:
        y = branch
    taps["post_residual"] = y = block.act(y)
    return y, taps


class BasicBlock(nn.Module):
    """ResNet v1 basic block: conv3×3-BN-ReLU-conv3×3-BN, add shortcut, ReLU.

    (B, H, W, C) -> (B, H/strides, W/strides, filters). Taps: conv1, pre_residual, post_residual.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array] = nn.relu
    strides: int = 1
    residual: bool = True
    zero_init_last_bn: bool = False

    TAPS: ClassVar[tuple[str, ...]] = ("conv1", "pre_residual", "post_residual")

    @nn.compact
    def __call__(self, x: jax.Array, skip: bool = False) -> tuple[jax.Array, Taps]:
        taps: Taps = OrderedDict()
        if skip:
            return _close_block(self, x, None, self.filters, taps)
        y = self.conv(self.filters, (3, 3), self.strides, name="conv1")(x)
        taps["conv1"] = y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        last_scale_init = nn.initializers.zeros_init() if self.zero_init_last_bn else nn.initializers.ones_init()
        taps["pre_residual"] = y = self.norm(scale_init=last_scale_init, name="bn2")(y)
        return _close_block(self, x, y, self.filters, taps)


class BottleneckBlock(nn.Module):
    """ResNet v1.5 bottleneck: conv1×1-BN-ReLU, conv3×3(stride)-BN-ReLU, conv1×1(4·filters)-BN,
    add shortcut, ReLU.

    (B, H, W, C) -> (B, H/strides, W/strides, 4·filters). Taps: conv1, conv2, pre_residual,
    post_residual.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array] = nn.relu
    strides: int = 1
    residual: bool = True
    zero_init_last_bn: bool = False

    TAPS: ClassVar[tuple[str, ...]] = ("conv1", "conv2", "pre_residual", "post_residual")

    @nn.compact
    def __call__(self, x: jax.Array, skip: bool = False) -> tuple[jax.Array, Taps]:
        taps: Taps = OrderedDict()
        out_filters = 4 * self.filters
        if skip:
            return _close_block(self, x, None, out_filters, taps)
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        taps["conv1"] = y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), self.strides, name="conv2")(y)
        taps["conv2"] = y = self.act(self.norm(name="bn2")(y))
        y = self.conv(out_filters, (1, 1), name="conv3")(y)
        last_scale_init = nn.initializers.zeros_init() if self.zero_init_last_bn else nn.initializers.ones_init()
        taps["pre_residual"] = y = self.norm(scale_init=last_scale_init, name="bn3")(y)
        return _close_block(self, x, y, out_filters, taps)


def block_name(stage: int, block: int) -> str:
    """Public name of a residual block, 0-based indices -> ``stage{stage+1}/block{block+1}``."""
    return f"stage{stage + 1}/block{block + 1}"


def block_names(stage_sizes: tuple[int, ...]) -> tuple[str, ...]:
    """Names of all residual blocks in network order."""
    return tuple(block_name(s, b) for s, size in enumerate(stage_sizes) for b in range(size))


def layer_names(
    stage_sizes: tuple[int, ...], block_taps: tuple[str, ...], skip: frozenset[str] = frozenset()
) -> tuple[str, ...]:
    """Names of every captured layer in network order; deleted blocks report only post_residual."""
    names = ["stem"]
    for block in block_names(stage_sizes):
        taps = ("post_residual",) if block in skip else block_taps
        names.extend(f"{block}/{tap}" for tap in taps)
    return (*names, "pool", "logits")


def residual_stages(
    x: jax.Array,
    acts: Taps,
    *,
    block_cls: type[nn.Module],
    stage_sizes: tuple[int, ...],
    stage_filters: tuple[int, ...],
    skip: frozenset[str],
    **block_kwargs: Any,
) -> jax.Array:
    """Runs the residual stages (stride 2 at the first block of every stage but the first) inside
    the calling module, recording every block's taps into `acts` under ``stage{i}/block{j}/tap``.

    Submodules are named ``stage{i}_block{j}``.
    """
    for s, (size, filters) in enumerate(zip(stage_sizes, stage_filters, strict=True)):
        for b in range(size):
            name = block_name(s, b)
            strides = 2 if s > 0 and b == 0 else 1
            block = block_cls(filters, strides=strides, name=name.replace("/", "_"), **block_kwargs)
            x, taps = block(x, skip=name in skip)
            acts.update((f"{name}/{tap}", value) for tap, value in taps.items())
    return x


def classifier_head(x: jax.Array, acts: Taps, num_classes: int, dtype: Any) -> jax.Array:
    """Global average pool + dense layer inside the calling module: (B, H, W, C) -> (B, num_classes)
    float32 logits, recording ``pool`` and ``logits`` into `acts`."""
    acts["pool"] = x = jnp.mean(x, axis=(1, 2))
    dense = nn.Dense(
        num_classes, dtype=dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.he_normal(), name="classifier"
    )
    acts["logits"] = logits = dense(x).astype(jnp.float32)
    return logits
