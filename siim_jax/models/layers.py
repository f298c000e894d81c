"""Building blocks shared by the encoders and the UNet, with PyTorch's geometry and BatchNorm semantics."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# torchvision's ResNet init (He normal, fan_out); smp re-initialises its decoder with He uniform (fan_in)
# and its heads with Xavier uniform.
ENCODER_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
DECODER_INIT = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")
HEAD_INIT = nnx.initializers.xavier_uniform()


def at_least_float32(x: jax.Array) -> jax.Array:
    """float32 for bfloat16/float32 compute (float64 stays, for parity checks)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    kernel_init=ENCODER_INIT,
    dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A square convolution padded like PyTorch's `padding=kernel_size // 2` (symmetric, also at stride 2)."""
    pad = kernel_size // 2
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class BatchNorm(nnx.Module):
    """BatchNorm over NHWC with PyTorch's semantics.

    Batch statistics are computed in float32 (at least) whatever the compute dtype, with a two-pass variance;
    the running variance is updated with the unbiased batch variance as PyTorch does, so converted statistics
    keep their meaning. `momentum` follows the Flax convention (0.9 here is PyTorch's 0.1). As in
    `nnx.BatchNorm`, each call says whether to normalise with the running statistics (inference) or with the
    batch's own (training, which also updates the running ones).
    """

    def __init__(self, features: int, *, dtype: Any, momentum: float = 0.9, epsilon: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
        wide = at_least_float32(x)
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = wide.mean(axes)
            var = jnp.square(wide - mean).mean(axes)
            count = x.size // x.shape[-1]
            unbiased = var * (count / max(count - 1, 1))
            m = self.momentum
            self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
            self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * unbiased)
        inv = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        return ((wide - mean) * inv + self.bias[...]).astype(self.dtype)


class ConvBNReLU(nnx.Module):
    """Conv (no bias) → BatchNorm → ReLU, smp's `Conv2dReLU` with batchnorm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, kernel_init, dtype, rngs):
        self.conv = conv(in_channels, out_channels, kernel_size, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.bn = BatchNorm(out_channels, dtype=dtype)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


def spatial_mean(x: jax.Array) -> jax.Array:
    """Global average pool over H and W (kept as 1x1), accumulated in float32."""
    return jnp.mean(at_least_float32(x), axis=(1, 2), keepdims=True).astype(x.dtype)


class SqueezeExcite(nnx.Module):
    """Channel gate: pool → 1x1 conv → ReLU → 1x1 conv → sigmoid, times the input (SENet's SE, smp's cSE)."""

    def __init__(self, channels: int, reduction: int, *, kernel_init, dtype, rngs):
        hidden = channels // reduction
        self.fc1 = conv(channels, hidden, 1, bias=True, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.fc2 = conv(hidden, channels, 1, bias=True, kernel_init=kernel_init, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(spatial_mean(x)))))


class SCSE(nnx.Module):
    """Concurrent spatial and channel squeeze & excitation (smp's `SCSEModule`, reduction 16)."""

    def __init__(self, channels: int, *, dtype, rngs, reduction: int = 16):
        self.channel_gate = SqueezeExcite(channels, reduction, kernel_init=DECODER_INIT, dtype=dtype, rngs=rngs)
        self.spatial_gate = conv(channels, 1, 1, bias=True, kernel_init=DECODER_INIT, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.channel_gate(x) + x * jax.nn.sigmoid(self.spatial_gate(x))


def max_pool_3x3_s2(x: jax.Array, *, ceil_mode: bool) -> jax.Array:
    """3x3 stride-2 max pool: padding 1 (torchvision, timm) or Caffe's ceil_mode without padding (Cadene SENet).

    ceil_mode on an even size equals padding (0, 1); on an odd size it needs no padding at all. The padding is
    -inf written out before an unpadded pool (the same values and gradients) because jax2onnx exports
    `nnx.max_pool` with 'SAME' or 'VALID' padding only.
    """
    if ceil_mode:
        padding = tuple((0, 1 - size % 2) for size in x.shape[1:3])
    else:
        padding = ((1, 1), (1, 1))
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # PyTorch's legacy 'nearest': floor(i * in/out) computed in float32, clamped to the last row.
    scale = np.float32(in_size) / np.float32(out_size)
    indices = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(indices, in_size - 1)


def resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
    """`F.interpolate(mode='nearest', size=(height, width))` on NHWC."""
    for axis, size in ((1, height), (2, width)):
        if size == 2 * x.shape[axis]:
            x = jnp.repeat(x, 2, axis=axis)  # the usual U-Net case; cheaper than a gather
        elif size != x.shape[axis]:
            x = jnp.take(x, _nearest_indices(x.shape[axis], size), axis=axis)
    return x


def call(module: nnx.Module, *args, train: bool, remat: bool):
    """`module(*args, train=train)`, recomputing its activations in the backward pass when `remat` is set."""
    if not remat:
        return module(*args, train=train)

    def forward(module: nnx.Module, *args):  # `train` stays a Python bool, out of the traced arguments
        return module(*args, train=train)

    return nnx.remat(forward)(module, *args)
