"""The encoder's first convolution (7x7/2, 3 → 64) computed three ways on the same (7, 7, 3, 64) kernel.

The input is always the three-channel ImageNet-normalised image that `augment.model_input` makes. A GPU's
convolution libraries pad a 3-channel input to their vector width, so `config.model.stem` offers:
- "rgb": the convolution as written (the default);
- "pad4": input and kernel padded with a zero fourth channel, which adds only zero terms;
- "grey": the three channels folded into one, for inputs whose channels are the same grey image g normalised per
  channel, x_c = (g - m_c) / s_c, as the project's inputs are. Then x_c = x_0 s_0 / s_c + (m_0 - m_c) / s_c, so

      conv(x; w) = conv(x_0; Σ_c w_c s_0 / s_c) + conv(1; Σ_c w_c (m_0 - m_c) / s_c),

  where both convolutions are zero-padded like the original: `1` is an all-ones image of the input's size, so the
  second term is exact on the border too, where the zero padding leaves part of the window outside the image (a
  constant would be exact only away from it). It depends on the kernel and the image size alone, and is computed
  on one image per call. Inputs whose channels differ get a wrong answer: "grey" is for grey images only.

The kernel keeps its three-channel form in checkpoints; the variants rearrange it at call time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from siim_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD

STEMS = ("rgb", "pad4", "grey")  # config.model.stem


def stem_conv(conv: nnx.Conv, x: jax.Array, stem: str) -> jax.Array:
    """`conv(x)` for the normalised NHWC input `x`, computed as `stem` says (see the module docstring)."""
    if stem not in STEMS:
        raise ValueError(f"model.stem must be one of {STEMS}, got {stem!r}")
    if stem == "rgb":
        return conv(x)
    if x.shape[-1] != 3:
        raise ValueError(f"the {stem!r} stem takes the 3-channel normalised image, got {x.shape[-1]} channels")
    kernel = conv.kernel[...]
    if stem == "pad4":
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1)))
        kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, 1), (0, 0)))  # HWIO: a fourth input channel
        return _convolve(conv, x, kernel, conv.dtype)
    std = IMAGENET_STD.astype(np.float64)  # widened so that a float64 model folds in float64
    ratio, offset = std[0] / std, (IMAGENET_MEAN[0] - IMAGENET_MEAN.astype(np.float64)) / std
    folded = jnp.einsum("hwco,c->hwo", kernel, ratio.astype(kernel.dtype))[:, :, None]
    border = jnp.einsum("hwco,c->hwo", kernel, offset.astype(kernel.dtype))[:, :, None]
    offset_term = offset_map(conv, border, x.shape[1:3])
    return (_convolve(conv, x[..., :1], folded, conv.dtype) + offset_term).astype(conv.dtype)


def offset_map(conv: nnx.Conv, kernel: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(1, H', W', out) `conv`'s geometry applied with `kernel` to an all-ones image of `size`, zero-padded: the
    fold's offset term. Inside it is the kernel's sum; on the border only the part of the window inside the image
    counts. One image at the kernel's precision, whatever the batch."""
    return _convolve(conv, jnp.ones((1, *size, 1), kernel.dtype), kernel, kernel.dtype)


def _convolve(conv: nnx.Conv, x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """`conv`'s geometry (strides, padding) on another input and kernel, computing in `dtype`."""
    return jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        window_strides=(conv.strides,) * 2,
        padding=conv.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
