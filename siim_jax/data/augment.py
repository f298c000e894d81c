"""Image and mask at the training size: resizing, the seed's train augmentation and ImageNet normalisation.

Batches leave the host as uint8 grey images and uint8 {0, 1} masks; `model_input` and `model_mask` turn them into
the model's float32 NHWC input and float32 mask inside the jitted functions (a quarter of the host-to-device bytes
of a normalised three-channel image). Both go through the same 256-entry table as the host's `normalise`, so the
pixels the model sees are bit-for-bit those the host would compute.

The seed augments at 1024² and resizes last. Here the image is resized first and augmented at the training size,
about 5x cheaper, with the same distribution: a flip or an affine map commutes with resizing (up to
interpolation), and Gaussian noise is added with the standard deviation the seed's noise keeps after the
resize (`linear_resize_noise_gain`). Noise goes on the grey image before it is replicated to three channels.

albumentations 2.x silently ignores 1.x argument names, so only 2.x names appear here (Affine with fill /
fill_mask, GaussNoise with std_range as a fraction of 255).
"""

from __future__ import annotations

import os
import random

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ORIGINAL_SIZE = 1024  # the challenge's images; the noise level below is specified at this size
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# grey level -> the three normalised channels the ImageNet encoder expects, as a 3-channel OpenCV lookup table
_NORMALISED = ((np.arange(256, dtype=np.float32)[:, None] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).reshape(1, 256, 3)


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Resizes an image (bilinear, as albumentations' Resize) and its mask (nearest) to size x size."""
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    if mask is not None and mask.shape[:2] != (size, size):
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return image, mask


def linear_resize_noise_gain(source_size: int, target_size: int) -> float:
    """Factor on the std of white pixel noise that bilinear resizing from source_size to target_size applies.

    An output pixel mixes two neighbours per axis with weights (1 - f, f), which scales the noise variance by
    (1 - f)² + f²; averaged over the output positions and multiplied over both axes, the std gain is that mean.
    """
    if source_size == target_size:
        return 1.0
    position = (np.arange(target_size) + 0.5) * source_size / target_size - 0.5
    fraction = position - np.floor(position)
    return float(np.mean((1.0 - fraction) ** 2 + fraction**2))


class TrainAugment:
    """The seed's train pipeline applied jointly to a uint8 image and its mask at the training size.

    Each call takes the element's own generator, so the result depends only on it. One instance serves one
    thread at a time (albumentations keeps the random state on the pipeline).
    """

    def __init__(self, config: ml_collections.ConfigDict, image_size: int):
        # Imported here, not with the module: albumentations also imports torch when it is installed (seconds),
        # which predict, tune and evaluate never need.
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import, in every worker process
        import albumentations as A

        gain = linear_resize_noise_gain(ORIGINAL_SIZE, image_size)
        low, high = (float(std) * gain for std in config.noise_std_range)
        self._pipeline = A.Compose(
            [
                A.HorizontalFlip(p=config.hflip_p),
                A.Affine(
                    scale=(1.0 - config.scale, 1.0 + config.scale),
                    rotate=(-config.rotate, config.rotate),
                    translate_percent=(-config.shift, config.shift),
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=0,
                    p=config.affine_p,
                ),
                A.GaussNoise(std_range=(low, high), p=config.noise_p),
            ]
        )

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        self._pipeline.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        out = self._pipeline(image=image, mask=mask)
        return out["image"], out["mask"]


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 grey (..., H, W) -> float32 (..., H, W, 3) ImageNet-normalised, grey replicated to three channels: the
    host's twin of `model_input`, for code that hands a model float input. OpenCV's lookup writes each image
    straight into the batch, about 2.5x faster than a NumPy gather."""
    greys = images.reshape(-1, *images.shape[-2:])
    normalised = np.empty((*greys.shape, 3), np.float32)
    for grey, out in zip(greys, normalised):
        cv2.LUT(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), _NORMALISED, dst=out)
    return normalised.reshape(*images.shape, 3)


def model_input(images: jax.Array) -> jax.Array:
    """The model's float NHWC input from a batch's images, inside a jitted function: uint8 grey (..., H, W) is
    ImageNet-normalised and replicated to three channels by a lookup in the table `normalise` uses (exactly its
    values); float NHWC input (a converted model's, the parity tests') passes unchanged."""
    if images.dtype != jnp.uint8:
        return images
    return jnp.asarray(_NORMALISED[0])[images]


def model_mask(masks: jax.Array) -> jax.Array:
    """A batch's uint8 {0, 1} masks (..., H, W) as the float32 (..., H, W, 1) the losses and metrics take; float
    masks with their channel axis pass unchanged."""
    if masks.dtype != jnp.uint8:
        return masks
    return masks[..., None].astype(jnp.float32)
