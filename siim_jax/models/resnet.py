"""ResNet-family encoders: torchvision ResNet18/34/50 and SE-ResNeXt50/101_32x4d (Cadene/smp and timm variants).

Module names follow torchvision's (`conv1`, `bn1`, `layer1`..`layer4`, `downsample`) so that the conversion
tables stay short. Each encoder returns the five feature maps a UNet needs, at strides 2, 4, 8, 16 and 32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from siim_jax.models.layers import ENCODER_INIT, BatchNorm, SqueezeExcite, call, conv, max_pool_3x3_s2
from siim_jax.models.stem import stem_conv


class Projection(nnx.Module):
    """The shortcut's 1x1 strided conv + BatchNorm when a block changes shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, dtype, norm: str, rngs):
        self.conv = conv(in_channels, out_channels, 1, stride=stride, dtype=dtype, rngs=rngs)
        self.bn = BatchNorm(out_channels, dtype=dtype, norm=norm)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.bn(self.conv(x), use_running_average=not train)


class ResidualBlock(nnx.Module):
    """relu(branch(x) + shortcut(x)); subclasses define `merge` (the branch, its residual add and the ReLU) and may
    set `downsample`."""

    downsample: Projection | None

    def merge(self, x: jax.Array, shortcut: jax.Array, *, train: bool) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(x, train=train)
        return self.merge(x, shortcut, train=train)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    block: type[ResidualBlock]
    layers: tuple[int, int, int, int]
    groups: int = 1
    base_width: int = 64
    se_reduction: int | None = None  # squeeze-excite on each block's residual branch (SE-ResNeXt)
    ceil_mode_pool: bool = False  # Cadene's Caffe-style stem max pool


class BasicBlock(ResidualBlock):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, spec: EncoderSpec, *, dtype, norm: str, rngs):
        self.conv1 = conv(in_channels, planes, 3, stride=stride, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype, norm=norm)
        self.conv2 = conv(planes, planes, 3, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype, norm=norm)
        self.downsample = _projection_if_needed(in_channels, planes, stride, dtype=dtype, norm=norm, rngs=rngs)

    def merge(self, x: jax.Array, shortcut: jax.Array, *, train: bool) -> jax.Array:
        use_running = not train
        x = self.bn1(self.conv1(x), use_running_average=use_running, relu=True)
        return self.bn2(self.conv2(x), use_running_average=use_running, residual=shortcut, relu=True)


class Bottleneck(ResidualBlock):
    """1x1 → 3x3 (strided, grouped for ResNeXt) → 1x1, optionally followed by squeeze-excite."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, spec: EncoderSpec, *, dtype, norm: str, rngs):
        width = planes * spec.base_width // 64 * spec.groups
        out_channels = planes * self.expansion
        self.conv1 = conv(in_channels, width, 1, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(width, dtype=dtype, norm=norm)
        self.conv2 = conv(width, width, 3, stride=stride, groups=spec.groups, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(width, dtype=dtype, norm=norm)
        self.conv3 = conv(width, out_channels, 1, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(out_channels, dtype=dtype, norm=norm)
        self.se = (
            SqueezeExcite(out_channels, spec.se_reduction, kernel_init=ENCODER_INIT, dtype=dtype, rngs=rngs)
            if spec.se_reduction
            else None
        )
        self.downsample = _projection_if_needed(in_channels, out_channels, stride, dtype=dtype, norm=norm, rngs=rngs)

    def merge(self, x: jax.Array, shortcut: jax.Array, *, train: bool) -> jax.Array:
        use_running = not train
        x = self.bn1(self.conv1(x), use_running_average=use_running, relu=True)
        x = self.bn2(self.conv2(x), use_running_average=use_running, relu=True)
        if self.se is None:
            return self.bn3(self.conv3(x), use_running_average=use_running, residual=shortcut, relu=True)
        # The squeeze-excite gate comes between the BatchNorm and the residual add.
        return jax.nn.relu(self.se(self.bn3(self.conv3(x), use_running_average=use_running)) + shortcut)


def _projection_if_needed(in_channels, out_channels, stride, *, dtype, norm, rngs) -> Projection | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return Projection(in_channels, out_channels, stride, dtype=dtype, norm=norm, rngs=rngs)


_SE_RESNEXT = dict(block=Bottleneck, groups=32, base_width=4, se_reduction=16)

ENCODERS: dict[str, EncoderSpec] = {
    "resnet18": EncoderSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": EncoderSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": EncoderSpec(Bottleneck, (3, 4, 6, 3)),
    # Cadene's pretrainedmodels layout, as used by smp.
    "se_resnext50_32x4d": EncoderSpec(layers=(3, 4, 6, 3), ceil_mode_pool=True, **_SE_RESNEXT),
    "se_resnext101_32x4d": EncoderSpec(layers=(3, 4, 23, 3), ceil_mode_pool=True, **_SE_RESNEXT),
    # timm's: the same network with torchvision's padded stem pool.
    "seresnext50_32x4d": EncoderSpec(layers=(3, 4, 6, 3), **_SE_RESNEXT),
    "seresnext101_32x4d": EncoderSpec(layers=(3, 4, 23, 3), **_SE_RESNEXT),
}


class ResNetEncoder(nnx.Module):
    """7x7/2 stem → max pool → four residual stages; returns [stride 2, 4, 8, 16, 32] NHWC features.

    `norm`, `stem` and `maxpool` pick how BatchNorm, the first convolution and the max pool are computed
    (`config.model`'s keys of the same names); every choice holds the same variables.
    """

    def __init__(
        self,
        name: str,
        *,
        dtype: Any = jnp.float32,
        remat: bool = False,
        norm: str = "flax",
        stem: str = "rgb",
        maxpool: str = "reduce_window",
        rngs: nnx.Rngs,
    ):
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
        spec = ENCODERS[name]
        self.encoder_name = name
        self.dtype = dtype
        self.remat = remat
        self.stem = stem
        self.maxpool = maxpool
        self.ceil_mode_pool = spec.ceil_mode_pool
        self.conv1 = conv(3, 64, 7, stride=2, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(64, dtype=dtype, norm=norm)
        in_channels, stages = 64, []
        for planes, depth, stride in zip((64, 128, 256, 512), spec.layers, (1, 2, 2, 2)):
            blocks = []
            for index in range(depth):
                block_stride = stride if index == 0 else 1
                blocks.append(spec.block(in_channels, planes, block_stride, spec, dtype=dtype, norm=norm, rngs=rngs))
                in_channels = planes * spec.block.expansion
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = (64,) + tuple(planes * spec.block.expansion for planes in (64, 128, 256, 512))

    def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
        x = stem_conv(self.conv1, x.astype(self.dtype), self.stem)
        x = self.bn1(x, use_running_average=not train, relu=True)
        features = [x]
        x = max_pool_3x3_s2(x, ceil_mode=self.ceil_mode_pool, impl=self.maxpool)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = call(block, x, train=train, remat=self.remat)
            features.append(x)
        return features
