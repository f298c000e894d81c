import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from siim_jax.configs import defaults

from siim_jax.data import augment

SIZE = 96


def l_shape() -> np.ndarray:
    """An asymmetric shape: no flip or rotation maps it onto itself."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:80, 20:34] = 1
    mask[66:80, 20:64] = 1
    mask[20:30, 50:56] = 1
    return mask


def config(**overrides):
    result = defaults.default_augment_config()
    for key, value in overrides.items():
        setattr(result, key, value)
    return result


def test_image_and_mask_get_the_same_geometric_transform():
    mask = l_shape()
    image = (40 + 180 * mask).astype(np.uint8)
    pipeline = augment.TrainAugment(config(hflip_p=0.5, affine_p=1.0, rotate=25.0, shift=0.1), SIZE)
    moved = 0
    for seed in range(12):
        out_image, out_mask = pipeline(image, mask, np.random.default_rng(seed))
        assert out_mask.dtype == np.uint8 and set(np.unique(out_mask)) <= {0, 1}
        bright = out_image > 130
        iou = (bright & (out_mask == 1)).sum() / (bright | (out_mask == 1)).sum()
        assert iou > 0.9, (seed, iou)
        moved += (out_mask != mask).mean() > 0.02
    assert moved == 12


def test_flip_only_config_flips_exactly():
    mask = l_shape()
    image = np.arange(SIZE * SIZE, dtype=np.int64).reshape(SIZE, SIZE).astype(np.uint8)
    pipeline = augment.TrainAugment(config(hflip_p=1.0, affine_p=0.0, noise_p=0.0), SIZE)
    out_image, out_mask = pipeline(image, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])


def test_same_generator_same_result_other_generator_other_result():
    mask = l_shape()
    image = (40 + 180 * mask).astype(np.uint8)
    pipeline = augment.TrainAugment(config(affine_p=1.0, noise_p=1.0), SIZE)
    first = pipeline(image, mask, np.random.default_rng([7, 1]))
    again = pipeline(image, mask, np.random.default_rng([7, 1]))
    other = pipeline(image, mask, np.random.default_rng([7, 2]))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("target", [512, 384, 256])
def test_noise_gain_matches_opencv_resize(target):
    noise = np.random.default_rng(0).normal(0.0, 10.0, (1024, 1024)).astype(np.float32)
    resized = cv2.resize(noise, (target, target), interpolation=cv2.INTER_LINEAR)
    measured = resized[2:-2, 2:-2].std() / noise.std()
    assert augment.linear_resize_noise_gain(1024, target) == pytest.approx(measured, rel=0.03)
    assert augment.linear_resize_noise_gain(1024, 1024) == 1.0


def test_noise_std_is_the_seeds_after_resizing():
    """std_range is taken with its 2.x name: the measured noise is the configured std times the resize gain.
    (albumentations truncates the noise added to uint8 images, which takes about 0.4 grey levels off the std.)"""
    grey = np.full((256, 256), 128, np.uint8)
    std = 24.0 / 255.0
    pipeline = augment.TrainAugment(config(hflip_p=0.0, affine_p=0.0, noise_p=1.0, noise_std_range=(std, std)), 512)
    noisy, _ = pipeline(grey, np.zeros_like(grey), np.random.default_rng(0))
    measured = (noisy.astype(np.float32) - 128).std()
    assert measured == pytest.approx(24.0 * augment.linear_resize_noise_gain(1024, 512), rel=0.06)


def test_normalise_replicates_grey_with_imagenet_statistics():
    images = np.array([[[0, 255]]], np.uint8)
    out = augment.normalise(images)
    assert out.shape == (1, 1, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], -augment.IMAGENET_MEAN / augment.IMAGENET_STD, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1], (1 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD, rtol=1e-6)


def test_model_input_on_the_device_is_the_host_normalisation_bit_for_bit():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    on_device = np.asarray(jax.jit(augment.model_input)(images))
    assert on_device.shape == (1, 16, 16, 3) and on_device.dtype == np.float32
    np.testing.assert_array_equal(on_device, augment.normalise(images))
    # the ImageNet constants, in the order torchvision applies them: x / 255, minus the mean, over the std
    grey = np.arange(256, dtype=np.float32)[:, None]
    expected = (grey / np.float32(255) - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
    np.testing.assert_array_equal(on_device.reshape(256, 3), expected)


def test_float_input_and_masks_pass_unchanged_and_uint8_masks_become_float():
    floats = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(augment.model_input(jnp.asarray(floats)), floats)
    masks = np.array([[[0, 1], [1, 0]]], np.uint8)
    as_float = augment.model_mask(jnp.asarray(masks))
    assert as_float.shape == (1, 2, 2, 1) and as_float.dtype == jnp.float32
    np.testing.assert_array_equal(as_float[..., 0], masks)
    np.testing.assert_array_equal(augment.model_mask(as_float), as_float)


def test_resize_pair_keeps_the_mask_binary():
    mask = np.kron(l_shape(), np.ones((2, 2), np.uint8))
    image, small = augment.resize_pair(mask * 200, mask, 64)
    assert image.shape == small.shape == (64, 64)
    assert set(np.unique(small)) == {0, 1}
