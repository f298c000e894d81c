"""UNet equal to `segmentation_models_pytorch.Unet`, with smp's optional classification head (`aux_params`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from siim_jax.models.layers import (
    DECODER_INIT,
    HEAD_INIT,
    SCSE,
    ConvBNReLU,
    at_least_float32,
    call,
    conv,
    resize_nearest,
)
from siim_jax.models.resnet import ResNetEncoder


class SegOutput(NamedTuple):
    """What a segmentation model returns, in training and in inference alike."""

    mask_logits: jax.Array  # (N, H, W, classes), float32 at least
    class_logits: jax.Array | None  # (N, classes); None without a classification head


class DecoderBlock(nnx.Module):
    """[concat skip → SCSE] → Conv3x3-BN-ReLU twice → [SCSE], on an already upsampled input."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, *, attention, dtype, norm: str = "flax", rngs
    ):
        merged = in_channels + skip_channels
        # smp also builds attention1 for the skip-less last block but never calls it; it is left out here.
        self.attention1 = SCSE(merged, dtype=dtype, rngs=rngs) if attention and skip_channels else None
        self.conv1 = ConvBNReLU(merged, out_channels, 3, kernel_init=DECODER_INIT, dtype=dtype, norm=norm, rngs=rngs)
        self.conv2 = ConvBNReLU(
            out_channels, out_channels, 3, kernel_init=DECODER_INIT, dtype=dtype, norm=norm, rngs=rngs
        )
        self.attention2 = SCSE(out_channels, dtype=dtype, rngs=rngs) if attention else None

    def __call__(self, x: jax.Array, skip: jax.Array | None, *, train: bool) -> jax.Array:
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
            if self.attention1 is not None:
                x = self.attention1(x)
        x = self.conv2(self.conv1(x, train=train), train=train)
        return x if self.attention2 is None else self.attention2(x)


class ClassificationHead(nnx.Module):
    """Global average pool → dropout → dense, on the deepest encoder feature (smp's `ClassificationHead`)."""

    def __init__(self, in_channels: int, classes: int, dropout: float, *, rngs):
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.fc = nnx.Linear(in_channels, classes, kernel_init=HEAD_INIT, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        pooled = jnp.mean(at_least_float32(x), axis=(1, 2))
        return self.fc(self.dropout(pooled, deterministic=not train))


class UNet(nnx.Module):
    """`model(x, train=...)`, x NHWC → `SegOutput(mask logits (N, H, W, classes), class logits (N, classes) or None)`.

    `train` selects batch statistics (updating the running ones) and active dropout; inference passes False.
    """

    def __init__(
        self,
        encoder: str,
        *,
        classes: int = 1,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        attention: str | None = None,
        cls_head: bool = False,
        cls_dropout: float = 0.2,
        dtype: Any = jnp.float32,
        remat: bool = False,
        norm: str = "flax",
        stem: str = "rgb",
        maxpool: str = "reduce_window",
        rngs: nnx.Rngs,
    ):
        if attention not in (None, "scse"):
            raise ValueError(f"attention must be None or 'scse', got {attention!r}")
        if len(decoder_channels) != 5:
            raise ValueError(f"one decoder width per encoder stage (5), got {decoder_channels}")
        self.encoder = ResNetEncoder(
            encoder, dtype=dtype, remat=remat, norm=norm, stem=stem, maxpool=maxpool, rngs=rngs
        )
        in_channels = (self.encoder.out_channels[-1], *decoder_channels[:-1])
        skip_channels = (*self.encoder.out_channels[-2::-1], 0)
        self.decoder = nnx.List(
            [
                DecoderBlock(block_in, skip, block_out, attention=attention, dtype=dtype, norm=norm, rngs=rngs)
                for block_in, skip, block_out in zip(in_channels, skip_channels, decoder_channels)
            ]
        )
        self.segmentation_head = conv(
            decoder_channels[-1], classes, 3, bias=True, kernel_init=HEAD_INIT, dtype=dtype, rngs=rngs
        )
        self.classification_head = (
            ClassificationHead(self.encoder.out_channels[-1], classes, cls_dropout, rngs=rngs) if cls_head else None
        )
        self.remat = remat

    def __call__(self, x: jax.Array, *, train: bool) -> SegOutput:
        features = self.encoder(x, train=train)
        # Each block upsamples to its skip's size; the last one has no skip and upsamples to the input's.
        skips = features[-2::-1] + [None]
        targets = [f.shape[1:3] for f in features[-2::-1]] + [x.shape[1:3]]
        y = features[-1]
        for block, skip, target in zip(self.decoder, skips, targets):
            y = call(block, resize_nearest(y, *target), skip, train=train, remat=self.remat)
        masks = at_least_float32(self.segmentation_head(y))
        if self.classification_head is None:
            return SegOutput(masks, None)
        return SegOutput(masks, self.classification_head(features[-1], train=train))
