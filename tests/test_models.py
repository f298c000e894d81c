"""The Flax encoders and UNet: shapes, dtypes, PyTorch geometry of the odd layers, remat, parameter counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from siim_jax.configs.defaults import default_model_config

from siim_jax.models import UNet, build_model, build_unfilled
from siim_jax.models.layers import BatchNorm, call, max_pool_3x3_s2, resize_nearest
from siim_jax.models.unet import DecoderBlock

from .conftest import reference_import

SMALL = dict(encoder="resnet18", attention="scse", cls_head=True, classes=2)


def _config(**overrides):
    config = default_model_config()
    config.update(overrides)
    return config


@jax.jit
def _forward(model, x):
    return model(x, train=False)


@pytest.fixture(scope="module")
def small_unet() -> UNet:
    return build_model(_config(**SMALL))


def test_unet_returns_float32_mask_and_class_logits_at_any_input_size(small_unet):
    masks, labels = _forward(small_unet, jnp.ones((2, 70, 98, 3)))  # not a multiple of 32
    assert masks.shape == (2, 70, 98, 2) and masks.dtype == jnp.float32
    assert labels.shape == (2, 2) and labels.dtype == jnp.float32


def test_unet_without_classification_head_returns_masks_only():
    model = build_unfilled(_config(encoder="resnet18", cls_head=False))
    assert model.classification_head is None
    shapes = jax.eval_shape(_forward, model, jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32))
    assert shapes.mask_logits.shape == (1, 64, 96, 1) and shapes.class_logits is None


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "se_resnext50_32x4d", "se_resnext101_32x4d", "seresnext50_32x4d"]
)
def test_encoders_give_five_features_at_strides_2_to_32(name):
    encoder = build_unfilled(_config(encoder=name, encoder_only=True))
    features = jax.eval_shape(_forward, encoder, jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32))
    assert [f.shape[1:3] for f in features] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert tuple(f.shape[-1] for f in features) == encoder.out_channels


@pytest.fixture(scope="module")
def bfloat16_unet(small_unet) -> UNet:
    model = build_unfilled(_config(**SMALL, dtype="bfloat16"))
    nnx.update(model, nnx.state(small_unet, (nnx.Param, nnx.BatchStat)))
    return model


def test_bfloat16_compute_gives_the_float32_masks_and_classes(small_unet, bfloat16_unet):
    """Judged by what the logits are for: thresholded at 0 (probability 0.5), bfloat16's masks and classes are
    float32's, except at pixels whose float32 logit lies within bfloat16's rounding of the threshold. bfloat16 keeps
    8 significant bits; over the net's ~20 rounded layers the logits move by about 3% of their RMS, so a flip is
    allowed only where |logit| < 0.25·RMS, and on at most 1% of pixels (measured: 0.5%, margin 0.12·RMS).
    Parameters rounded to float8 (4 significant bits) flip 3% of pixels, some at 1.3·RMS."""
    x = jax.random.normal(jax.random.key(0), (2, 70, 98, 3))
    for ours, reference in zip(_forward(bfloat16_unet, x), _forward(small_unet, x)):
        assert ours.dtype == jnp.float32
        ours, reference = np.asarray(ours), np.asarray(reference)
        flipped = (ours > 0) != (reference > 0)
        assert flipped.mean() <= 0.01
        rms = np.sqrt(np.mean(reference**2))
        assert np.all(np.abs(reference[flipped]) < 0.25 * rms), np.abs(reference[flipped]).max() / rms


def test_bfloat16_training_keeps_float32_parameters_and_statistics(bfloat16_unet):
    graphdef, state = nnx.split(bfloat16_unet)

    def train_forward(state, x):
        model = nnx.merge(graphdef, state, copy=True)
        model(x, train=True)
        return nnx.state(model, (nnx.Param, nnx.BatchStat))

    updated = jax.eval_shape(train_forward, state, jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32))
    assert {leaf.dtype for leaf in jax.tree.leaves(updated)} == {jnp.dtype(jnp.float32)}


def test_batchnorm_keeps_pytorchs_unbiased_running_variance():
    norm = BatchNorm(3, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 3)) * 2 + 1
    norm(x, use_running_average=False)
    flat = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(norm.mean[...], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(norm.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("size", [(12, 18), (13, 17), (7, 8)])
def test_stem_max_pool_matches_pytorch(size, ceil_mode):
    torch = reference_import("torch")
    x = np.random.default_rng(0).standard_normal((1, 4, *size)).astype(np.float32)
    padding = 0 if ceil_mode else 1
    reference = torch.nn.functional.max_pool2d(torch.from_numpy(x), 3, 2, padding, ceil_mode=ceil_mode).numpy()
    ours = max_pool_3x3_s2(jnp.asarray(x.transpose(0, 2, 3, 1)), ceil_mode=ceil_mode)
    np.testing.assert_array_equal(np.asarray(ours).transpose(0, 3, 1, 2), reference)


@pytest.mark.parametrize("source, target", [((3, 5), (6, 10)), ((4, 7), (7, 13)), ((5, 3), (9, 6)), ((6, 6), (6, 6))])
def test_nearest_resize_matches_pytorch(source, target):
    torch = reference_import("torch")
    x = np.random.default_rng(0).standard_normal((1, 2, *source)).astype(np.float32)
    reference = torch.nn.functional.interpolate(torch.from_numpy(x), size=target, mode="nearest").numpy()
    ours = resize_nearest(jnp.asarray(x.transpose(0, 2, 3, 1)), *target)
    np.testing.assert_array_equal(np.asarray(ours).transpose(0, 3, 1, 2), reference)


def test_remat_changes_neither_gradients_nor_batchnorm_updates():
    block = DecoderBlock(16, 16, 16, attention="scse", dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(block, nnx.Param, nnx.BatchStat)
    x, skip = jax.random.normal(jax.random.key(1), (2, 2, 6, 10, 16))

    def loss_and_stats(params, remat):
        module = nnx.merge(graphdef, params, stats, copy=True)
        y = call(module, x, skip, train=True, remat=remat)
        return jnp.mean(jnp.sin(y)), nnx.state(module, nnx.BatchStat)

    results = [jax.jit(jax.grad(loss_and_stats, has_aux=True), static_argnums=1)(params, r) for r in (False, True)]
    for plain, rematerialised in zip(*(jax.tree.leaves(r) for r in results)):
        np.testing.assert_allclose(plain, rematerialised, rtol=1e-6, atol=1e-7)


def _parameter_count(model: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("encoder, attention", [("resnet50", None), ("se_resnext50_32x4d", None), ("resnet50", "scse")])
def test_parameter_count_equals_smp(encoder, attention):
    smp = reference_import("segmentation_models_pytorch")
    reference = smp.Unet(encoder, encoder_weights=None, classes=1, decoder_attention_type=attention)
    expected = sum(p.numel() for p in reference.parameters())
    if attention:  # smp also builds attention1 for its skip-less last block but never calls it
        expected -= sum(p.numel() for p in reference.decoder.blocks[-1].attention1.parameters())
    ours = _parameter_count(build_unfilled(_config(encoder=encoder, attention=attention, cls_head=False)))
    print(f"\nPARAMETERS Unet-{encoder}{'-scse' if attention else ''}: ours {ours:,}, smp {expected:,}")
    assert ours == expected
