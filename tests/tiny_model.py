"""A model with the UNet's interface that compiles in a second, for tests of the training machinery."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from siim_jax.models import SegOutput
from siim_jax.models.layers import BatchNorm


class TinySegmenter(nnx.Module):
    """conv → [BatchNorm] → relu → conv to mask logits, plus a dropout → dense class head.

    `batch_norm=False` makes every image's loss independent of the others in its batch.
    """

    def __init__(self, *, batch_norm: bool = True, dropout: float = 0.5, rngs: nnx.Rngs):
        # No bias before BatchNorm (as in the real nets): its gradient is only rounding noise, which Adam would
        # scale up to full-size steps that differ from one device layout to another.
        self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=not batch_norm, rngs=rngs)
        self.bn = BatchNorm(8, dtype=jnp.float32) if batch_norm else None
        self.conv2 = nnx.Conv(8, 1, (3, 3), rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.fc = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x, *, train: bool) -> SegOutput:
        h = self.conv1(x)
        h = jax.nn.relu(h if self.bn is None else self.bn(h, use_running_average=not train))
        pooled = self.dropout(h.mean(axis=(1, 2)), deterministic=not train)
        return SegOutput(self.conv2(h), self.fc(pooled))


def build_tiny_model(model_config=None, rngs: nnx.Rngs | None = None) -> TinySegmenter:
    """A stand-in for `siim_jax.models.build_model` (patch it there and in `siim_jax.training.loop`)."""
    return TinySegmenter(rngs=rngs or nnx.Rngs(0))


def random_batch(seed: int, size: int, pixels: int = 16) -> dict[str, np.ndarray]:
    """Images with a bright square where the mask is set, about half of them positive."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(size, pixels, pixels, 3)).astype(np.float32)
    masks = np.zeros((size, pixels, pixels, 1), np.float32)
    positive = rng.random(size) < 0.5
    for i in np.flatnonzero(positive):
        top, left = rng.integers(0, pixels // 2, size=2)
        masks[i, top : top + pixels // 3, left : left + pixels // 3] = 1.0
    images += 2.0 * masks
    return {"image": images, "mask": masks, "positive": positive.astype(np.float32)}
