"""Building blocks shared by the encoders and the UNet, with PyTorch's geometry and BatchNorm semantics."""

from __future__ import annotations

import functools
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


NORMS = ("flax", "fused")  # config.model.norm


class BatchNorm(nnx.Module):
    """BatchNorm over NHWC with PyTorch's semantics, optionally followed by `+ residual` and ReLU.

    The running variance is updated with the unbiased batch variance as PyTorch does, so converted statistics
    keep their meaning. `momentum` follows the Flax convention (0.9 here is PyTorch's 0.1). As in
    `nnx.BatchNorm`, each call says whether to normalise with the running statistics (inference) or with the
    batch's own (training, which also updates the running ones).

    `norm` picks the implementation; both hold the same variables, so checkpoints load either way:
    - "flax": statistics in float32 (at least) with a two-pass variance; the output is cast to the compute dtype,
      then the residual is added and the ReLU applied, each as its own JAX operation.
    - "fused": `norm_act_train` in training: statistics in one float32 pass, and normalisation, residual, ReLU
      and cast as one expression forward and one backward (a custom VJP), so that each activation is read as
      few times as possible.
    """

    def __init__(self, features: int, *, dtype: Any, norm: str = "flax", momentum: float = 0.9, epsilon: float = 1e-5):
        if norm not in NORMS:
            raise ValueError(f"model.norm must be one of {NORMS}, got {norm!r}")
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.norm = norm

    def __call__(
        self, x: jax.Array, *, use_running_average: bool, residual: jax.Array | None = None, relu: bool = False
    ) -> jax.Array:
        """relu?(bn(x) [+ residual])."""
        if self.norm == "flax":
            y = self._flax(x, use_running_average)
            y = y if residual is None else y + residual
            return jax.nn.relu(y) if relu else y
        if use_running_average:
            inv = jax.lax.rsqrt(self.var[...] + self.epsilon)
            return _normalise_act(x, residual, self.mean[...], inv, self.scale[...], self.bias[...], relu, self.dtype)
        # The running mean shifts the one-pass sums (see `_one_pass_statistics`); no gradient flows into it.
        y, mean, var = norm_act_train(
            x, residual, self.scale[...], self.bias[...], jax.lax.stop_gradient(self.mean[...]),
            self.epsilon, relu, self.dtype,
        )  # fmt: skip
        self._update_running(jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var), x.size // x.shape[-1])
        return y

    def _flax(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        wide = at_least_float32(x)
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = wide.mean(axes)
            var = jnp.square(wide - mean).mean(axes)
            self._update_running(mean, var, x.size // x.shape[-1])
        inv = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        return ((wide - mean) * inv + self.bias[...]).astype(self.dtype)

    def _update_running(self, mean: jax.Array, var: jax.Array, count: int) -> None:
        """PyTorch's update: momentum 0.1 (Flax's 0.9) towards the batch mean and the unbiased batch variance."""
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
        self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * unbiased)


def one_pass_statistics(wide: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, biased variance) per channel of NHWC `wide` from the sums of (x - shift) and (x - shift)² in one pass.

    var = E[(x - K)²] - (E[x] - K)² for any shift K. Summing k terms rounds each sum by at most γ_k = k u / (1 - k u)
    (u = 2⁻²⁴ in float32; k is the depth of the reduction: n - 1 for a sequential sum of n elements, far less for
    XLA's tree reductions), so with d = E[x] - K the computed variance is off by at most

        |Δvar| ≤ (γ_k + 2u) (2 var + 3 d²),   i.e. relative error ≤ (γ_k + 2u) (2 + 3 d² / var)

    to first order; the two-pass variance has no d² term. The cancellation grows with d² / var, so the shift is
    the running mean: once it tracks the batch means, d² / var is small whatever the activations' offset (at the
    first step it is PyTorch's initial 0, the plain E[x²] - E[x]² of flax's `use_fast_variance`). A variance
    rounded below zero is clamped to zero. tests/test_variants.py measures the error against this bound.
    """
    axes = tuple(range(wide.ndim - 1))
    centred = wide - shift
    offset = centred.mean(axes)
    return shift + offset, jnp.maximum(jnp.square(centred).mean(axes) - jnp.square(offset), 0.0)


def _normalise_act(x, residual, mean, inv, scale, bias, relu: bool, dtype) -> jax.Array:
    """relu?((x - mean) * inv * scale + bias [+ residual]) in float32 (at least), cast once to `dtype`."""
    y = (at_least_float32(x) - mean) * (inv * scale) + bias
    if residual is not None:
        y = y + at_least_float32(residual)
    return (jax.nn.relu(y) if relu else y).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def norm_act_train(x, residual, scale, bias, shift, epsilon: float, relu: bool, dtype):
    """(relu?(batch-normalised x * scale + bias [+ residual]) in `dtype`, batch mean, biased batch variance).

    The statistics are returned for the running averages only: their cotangents are ignored (BatchNorm applies
    `stop_gradient` to them), and so is `shift`'s. The backward pass keeps only x, the output and per-channel
    vectors: the ReLU's mask is read from the output (y > 0 exactly where the pre-activation is), so the
    pre-activation is never stored.
    """
    return _norm_act_forward(x, residual, scale, bias, shift, epsilon, relu, dtype)[0]


def _norm_act_forward(x, residual, scale, bias, shift, epsilon, relu, dtype):
    wide = at_least_float32(x)
    mean, var = one_pass_statistics(wide, shift)
    inv = jax.lax.rsqrt(var + epsilon)
    y = _normalise_act(x, residual, mean, inv, scale, bias, relu, dtype)
    residual_type = None if residual is None else jnp.zeros((), residual.dtype)  # only its dtype is needed
    saved = (x, y if relu else None, mean, inv, scale, residual_type, shift)
    return (y, mean, var), saved


def _norm_act_backward(epsilon, relu, dtype, saved, cotangents):
    x, y, mean, inv, scale, residual_type, shift = saved
    grad = at_least_float32(cotangents[0])
    if relu:
        grad = jnp.where(y > 0, grad, 0.0)
    axes = tuple(range(x.ndim - 1))
    normalised = (at_least_float32(x) - mean) * inv
    grad_bias = grad.sum(axes)
    grad_scale = (grad * normalised).sum(axes)
    count = x.size // x.shape[-1]
    # d/dx of (x - mean) * inv with mean and inv the batch's own: the standard BatchNorm backward.
    grad_x = (scale * inv) * (grad - grad_bias / count - normalised * (grad_scale / count))
    grad_residual = None if residual_type is None else grad.astype(residual_type.dtype)
    return grad_x.astype(x.dtype), grad_residual, grad_scale, grad_bias, jnp.zeros_like(shift)


norm_act_train.defvjp(_norm_act_forward, _norm_act_backward)


class ConvBNReLU(nnx.Module):
    """Conv (no bias) → BatchNorm → ReLU, smp's `Conv2dReLU` with batchnorm."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, kernel_init, dtype, norm: str = "flax", rngs
    ):
        self.conv = conv(in_channels, out_channels, kernel_size, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.bn = BatchNorm(out_channels, dtype=dtype, norm=norm)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.bn(self.conv(x), use_running_average=not train, relu=True)


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


MAXPOOLS = ("reduce_window", "slices")  # config.model.maxpool


def max_pool_3x3_s2(x: jax.Array, *, ceil_mode: bool, impl: str = "reduce_window") -> jax.Array:
    """3x3 stride-2 max pool: padding 1 (torchvision, timm) or Caffe's ceil_mode without padding (Cadene SENet).

    ceil_mode on an even size equals padding (0, 1); on an odd size it needs no padding at all. `impl` picks
    XLA's reduce_window (its gradient is a select_and_scatter) or `max_pool_slices` (a chain of selects). For
    reduce_window the padding is -inf written out before an unpadded pool (the same values and gradients) because
    jax2onnx exports `nnx.max_pool` with 'SAME' or 'VALID' padding only.
    """
    if impl not in MAXPOOLS:
        raise ValueError(f"model.maxpool must be one of {MAXPOOLS}, got {impl!r}")
    if ceil_mode:
        padding = tuple((0, 1 - size % 2) for size in x.shape[1:3])
    else:
        padding = ((1, 1), (1, 1))
    if impl == "slices":
        return max_pool_slices(x, 3, 2, padding)
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


def max_pool_slices(x: jax.Array, window: int, stride: int, padding) -> jax.Array:
    """Max pool over H and W of NHWC `x` as a running maximum over the window's strided slices, in PyTorch's order.

    PyTorch's max-pool scans each window row by row and keeps a value only when it is strictly greater (or NaN),
    so its backward sends a window's gradient to the FIRST maximum in that order. Here each slice replaces the
    running maximum under the same rule through `jnp.where`, whose gradient goes only to the selected branch:
    the gradient lands on that same first maximum, through selects and pads rather than a select_and_scatter.
    The -inf padding is never kept over a real value; a window whose real values are all -inf (never after a
    ReLU) would send its gradient to the padding, where PyTorch picks its first real entry.
    """
    (top, bottom), (left, right) = padding
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-jnp.inf)
    batch, height, width, channels = padded.shape
    out_h, out_w = (height - window) // stride + 1, (width - window) // stride + 1

    def window_slice(row: int, col: int) -> jax.Array:  # entry (row, col) of every window
        limit = (batch, row + stride * (out_h - 1) + 1, col + stride * (out_w - 1) + 1, channels)
        return jax.lax.slice(padded, (0, row, col, 0), limit, (1, stride, stride, 1))

    offsets = [(row, col) for row in range(window) for col in range(window)]  # PyTorch's scan order
    best = window_slice(*offsets[0])
    for offset in offsets[1:]:
        candidate = window_slice(*offset)
        best = jnp.where((candidate > best) | jnp.isnan(candidate), candidate, best)
    return best


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
