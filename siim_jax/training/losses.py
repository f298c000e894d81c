"""Segmentation and classification losses, always computed in float32.

Mask inputs are logits and targets of shape (N, H, W, 1) (any shape with the batch first works);
targets are {0, 1} (soft targets are accepted by every loss). Class inputs are logits (N, 1) and
labels (N,). Every function returns a scalar mean and is jittable.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from siim_jax.configs.defaults import default_loss_config

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _float32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _per_image_sum(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1).sum(axis=1)


def bce_with_logits(logits, targets) -> jax.Array:
    """Mean binary cross-entropy of `sigmoid(logits)` against `targets`."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(_float32(logits), _float32(targets)))


def sigmoid_focal_loss(logits, targets, alpha: float | None = 0.25, gamma: float = 2.0) -> jax.Array:
    """Mean binary focal loss (Lin et al. 2017): -a_t (1 - p_t)^gamma log(p_t).

    `alpha` weights the positive pixels and `1 - alpha` the negatives, as in
    torchvision.ops.sigmoid_focal_loss and smp's FocalLoss; `alpha=None` disables the weighting.
    """
    return jnp.mean(optax.sigmoid_focal_loss(_float32(logits), _float32(targets), alpha=alpha, gamma=gamma))


def _ratio_loss(numerator: jax.Array, denominator: jax.Array, smooth: float) -> jax.Array:
    return 1.0 - (numerator + smooth) / (denominator + smooth)


# Soft Dice stays ours: optax.losses.dice_loss scores (I + s) / ((P + T) / 2 + s), so its `smooth` is half of ours,
# and the weighted soft Dice below shares this ratio.
def soft_dice_loss(logits, targets, smooth: float = 1.0, per_image: bool = True) -> jax.Array:
    """1 - (2 sum(p y) + smooth) / (sum(p) + sum(y) + smooth) with p = sigmoid(logits).

    `per_image=True` computes the ratio for each image and averages (an empty-truth image then
    pushes its prediction towards empty); `per_image=False` takes the sums over the whole batch.
    """
    probs, targets = jax.nn.sigmoid(_float32(logits)), _float32(targets)
    sums = _per_image_sum if per_image else jnp.sum
    return jnp.mean(_ratio_loss(2.0 * sums(probs * targets), sums(probs) + sums(targets), smooth))


def weighted_soft_dice_loss(logits, targets, v1: float = 0.1, v2: float = 0.9, smooth: float = 1.0) -> jax.Array:
    """Weighted soft Dice (WSDice) of Wang et al., IEEE Access 2020, per image then mean.

    Pixel weights w = v1 + (v2 - v1) y give the background (y = 0) the small weight v1 so it enters
    the overlap; truth and prediction are mapped to g = w (2y - 1) and g_hat = w (2p - 1), and
    L = 1 - (2 sum(g_hat g) + s) / (sum(g_hat^2) + sum(g^2) + s). A perfect prediction gives 0.
    The paper's exact v1, v2 and s are not restated here; 0.1 / 0.9 / 1.0 are our defaults. The
    denominator is at least v1^2 H W, so s only matters when v1 = 0.
    """
    probs, targets = jax.nn.sigmoid(_float32(logits)), _float32(targets)
    weights = v1 + (v2 - v1) * targets
    truth = weights * (2.0 * targets - 1.0)
    pred = weights * (2.0 * probs - 1.0)
    numerator = 2.0 * _per_image_sum(pred * truth)
    denominator = _per_image_sum(pred**2) + _per_image_sum(truth**2)
    return jnp.mean(_ratio_loss(numerator, denominator, smooth))


def classification_loss(class_logits, labels) -> jax.Array:
    """BCE of the image-level head logits (N, 1) against the positive flags (N,)."""
    labels = _float32(labels)
    return bce_with_logits(_float32(class_logits).reshape(labels.shape), labels)


def _mask_components(cfg: Mapping[str, Any]) -> dict[str, Callable[[jax.Array, jax.Array], jax.Array]]:
    return {
        "bce": bce_with_logits,
        "focal": lambda x, y: sigmoid_focal_loss(x, y, cfg["focal_alpha"], cfg["focal_gamma"]),
        "dice": lambda x, y: soft_dice_loss(x, y, cfg["dice_smooth"], cfg["dice_per_image"]),
        "wsd": lambda x, y: weighted_soft_dice_loss(x, y, cfg["wsd_v1"], cfg["wsd_v2"], cfg["wsd_smooth"]),
    }


def _as_dict(config) -> dict[str, Any]:
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def make_loss(loss_config=None) -> LossFn:
    """Builds `loss_fn(mask_logits, masks, class_logits=None, labels=None) -> (loss, components)`.

    `loss_config` is an ml_collections.ConfigDict or a mapping with keys from `default_loss_config()`
    (missing keys take its defaults). Mask components are 'bce', 'focal', 'dice' and 'wsd'; the
    loss is the weighted sum of the components, which are returned unweighted by name.
    """
    defaults = default_loss_config().to_dict()
    cfg = {**defaults, **_as_dict(loss_config or {})}
    unknown_keys = sorted(set(cfg) - set(defaults))
    if unknown_keys:
        raise ValueError(f"unknown loss config keys {unknown_keys}; known: {sorted(defaults)}")
    weights = _as_dict(cfg["weights"])
    components = _mask_components(cfg)
    unknown_components = sorted(set(weights) - set(components))
    if unknown_components:
        raise ValueError(f"unknown loss components {unknown_components} in 'weights'; known: {sorted(components)}")
    cls_weight = float(cfg["cls_weight"])
    if not weights and cls_weight <= 0:
        raise ValueError("the loss config has no component: set 'weights' or 'cls_weight'")

    def loss_fn(mask_logits, masks, class_logits=None, labels=None):
        values = {name: components[name](mask_logits, masks) for name in weights}
        total_weights = dict(weights)
        if cls_weight > 0:
            if class_logits is None or labels is None:
                raise ValueError("cls_weight > 0 needs class_logits and labels")
            values["cls"] = classification_loss(class_logits, labels)
            total_weights["cls"] = cls_weight
        total = sum(float(total_weights[name]) * value for name, value in values.items())
        return jnp.asarray(total, jnp.float32), values

    return loss_fn
