import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from siim_jax.training import losses

from .conftest import reference_import

RTOL = 1e-5  # float32 against PyTorch's float32 (or a float64 formula): a few ulps of round-off


def _batch(seed=0, shape=(3, 16, 16, 1), positive_rate=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, shape).astype(np.float32)
    targets = (rng.random(shape) < positive_rate).astype(np.float32)
    return logits, targets


# References, each called directly on the same inputs: PyTorch, torchvision, smp, and the weighted soft Dice
# paper's formula in float64.


def _nchw(x):
    """NHWC numpy -> NCHW torch tensor."""
    torch = reference_import("torch")
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _torch_bce(logits, targets) -> float:
    torch = reference_import("torch")
    return float(torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(targets)))


def _torchvision_focal(logits, targets, alpha, gamma) -> float:
    ops = reference_import("torchvision.ops")
    return float(ops.sigmoid_focal_loss(_nchw(logits), _nchw(targets), alpha, gamma, reduction="mean"))


def _smp_dice(smooth):
    # smp 0.6 scores (I + s) / ((sum p + sum y) / 2 + s): its smooth s is our 2 s.
    smp_losses = reference_import("segmentation_models_pytorch.losses")
    return smp_losses.DiceLoss("binary", smooth=smooth / 2, eps=0.0)


def _smp_per_image_dice(logits, targets, smooth) -> float:
    # smp skips an image whose truth is empty, so the batches here have positives in every image.
    assert all(targets.reshape(len(targets), -1).any(axis=1))
    dice = _smp_dice(smooth)
    return float(np.mean([float(dice(_nchw(x[None]), _nchw(y[None]))) for x, y in zip(logits, targets)]))


def _wsd_reference(logits, targets, v1, v2, s):
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    values = []
    for pi, yi in zip(p, targets.astype(np.float64)):
        w = v1 + (v2 - v1) * yi
        g, g_hat = w * (2 * yi - 1), w * (2 * pi - 1)
        values.append(1 - (2 * (g_hat * g).sum() + s) / ((g_hat**2).sum() + (g**2).sum() + s))
    return np.mean(values)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.3, 3.5), (0.8, 0.5)])
def test_focal_matches_torchvision(alpha, gamma):
    logits, targets = _batch()
    expected = _torchvision_focal(logits, targets, alpha, gamma)
    assert float(losses.sigmoid_focal_loss(logits, targets, alpha, gamma)) == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_focal_matches_smp(alpha):
    smp_losses = reference_import("segmentation_models_pytorch.losses")
    logits, targets = _batch(seed=1)
    expected = smp_losses.FocalLoss("binary", alpha=alpha, gamma=3.5)(_nchw(logits), _nchw(targets))
    assert float(losses.sigmoid_focal_loss(logits, targets, alpha, 3.5)) == pytest.approx(float(expected), rel=RTOL)


def test_bce_matches_torch():
    logits, targets = _batch(seed=2)
    assert float(losses.bce_with_logits(logits, targets)) == pytest.approx(_torch_bce(logits, targets), rel=RTOL)


@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_batch_dice_matches_smp(smooth):
    logits, targets = _batch(seed=3)
    expected = _smp_dice(smooth)(_nchw(logits), _nchw(targets))
    got = losses.soft_dice_loss(logits, targets, smooth=smooth, per_image=False)
    assert float(got) == pytest.approx(float(expected), rel=RTOL)


def test_per_image_dice_matches_smp_image_by_image():
    logits, targets = _batch(seed=4)
    expected = _smp_per_image_dice(logits, targets, smooth=1.0)
    assert float(losses.soft_dice_loss(logits, targets, smooth=1.0)) == pytest.approx(expected, rel=RTOL)


def test_per_image_dice_counts_empty_truth_images():
    logits, targets = _batch(seed=5)
    targets[0] = 0.0
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    ratios = [(2 * (pi * ti).sum() + 1.0) / (pi.sum() + ti.sum() + 1.0) for pi, ti in zip(p, targets)]
    assert float(losses.soft_dice_loss(logits, targets)) == pytest.approx(1.0 - np.mean(ratios), rel=RTOL)


@pytest.mark.parametrize("v1,v2,s", [(0.1, 0.9, 1.0), (0.3, 0.7, 1e-6), (1.0, 1.0, 0.0)])
def test_weighted_soft_dice_matches_paper_formula(v1, v2, s):
    logits, targets = _batch(seed=6)
    targets[1] = 0.0
    got = losses.weighted_soft_dice_loss(logits, targets, v1, v2, s)
    assert float(got) == pytest.approx(_wsd_reference(logits, targets, v1, v2, s), rel=RTOL)


def test_weighted_soft_dice_is_zero_for_perfect_prediction():
    _, targets = _batch(seed=7)
    logits = np.where(targets > 0, 200.0, -200.0)  # sigmoid saturates to exactly 0 / 1 in float32
    assert float(losses.weighted_soft_dice_loss(logits, targets, 0.1, 0.9, 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_weighted_soft_dice_swapping_classes_and_weights_is_symmetric():
    # g and g_hat only change sign when foreground and background (and their weights) swap.
    logits, targets = _batch(seed=8)
    direct = losses.weighted_soft_dice_loss(logits, targets, 0.2, 0.8, 1.0)
    swapped = losses.weighted_soft_dice_loss(-logits, 1.0 - targets, 0.8, 0.2, 1.0)
    assert float(direct) == pytest.approx(float(swapped), rel=RTOL)


def test_classification_loss_matches_torch_on_flattened_head_logits():
    rng = np.random.default_rng(9)
    class_logits = rng.normal(size=(5, 1)).astype(np.float32)
    labels = np.array([1, 0, 0, 1, 1])
    expected = _torch_bce(class_logits[:, 0], labels.astype(np.float32))
    assert float(losses.classification_loss(class_logits, labels)) == pytest.approx(expected, rel=RTOL)
    # A (5, 1) against (5,) broadcast to (5, 5) would score every logit against every label: far off.
    assert _torch_bce(np.broadcast_to(class_logits, (5, 5)), np.broadcast_to(labels, (5, 5)).astype(np.float32)) != (
        pytest.approx(expected, rel=100 * RTOL)
    )


# Settings unlike both LOSS_DEFAULTS and the functions' defaults, so that a key that does not reach its component
# fails.
MIXED_CONFIG = {
    "weights": {"bce": 3.0, "dice": 1.0, "focal": 4.0, "wsd": 0.5},
    "focal_alpha": 0.4,
    "focal_gamma": 2.5,
    "dice_smooth": 0.5,
    "wsd_v1": 0.2,
    "wsd_v2": 0.7,
    "wsd_smooth": 1e-3,
    "cls_weight": 0.2,
}


def _mixed_inputs():
    logits, targets = _batch(seed=10)
    return logits, targets, np.array([[0.5], [-1.0], [2.0]], np.float32), np.array([1, 0, 1])


def _mixed_references(logits, targets, class_logits, labels) -> dict[str, float]:
    """Each component of MIXED_CONFIG from its reference, the settings written out by hand."""
    return {
        "bce": _torch_bce(logits, targets),
        "focal": _torchvision_focal(logits, targets, alpha=0.4, gamma=2.5),
        "dice": _smp_per_image_dice(logits, targets, smooth=0.5),
        "wsd": _wsd_reference(logits, targets, v1=0.2, v2=0.7, s=1e-3),
        "cls": _torch_bce(class_logits[:, 0], labels.astype(np.float32)),
    }


def test_mixed_loss_components_each_match_their_reference():
    inputs = _mixed_inputs()
    _, parts = jax.jit(losses.make_loss(ml_collections.ConfigDict(MIXED_CONFIG)))(*inputs)
    references = _mixed_references(*inputs)
    assert set(parts) == set(references)
    for name, reference in references.items():
        assert float(parts[name]) == pytest.approx(reference, rel=RTOL), name
    # The references lie far apart, so a component computed under another's name would fail above.
    values = sorted(references.values())
    assert min(b - a for a, b in zip(values, values[1:])) > 100 * RTOL * max(values)


def test_mixed_loss_is_the_hand_weighted_sum_of_references():
    inputs = _mixed_inputs()
    loss, _ = jax.jit(losses.make_loss(MIXED_CONFIG))(*inputs)
    ref = _mixed_references(*inputs)
    expected = 3.0 * ref["bce"] + 1.0 * ref["dice"] + 4.0 * ref["focal"] + 0.5 * ref["wsd"] + 0.2 * ref["cls"]
    assert float(loss) == pytest.approx(expected, rel=RTOL)
    # Each wrong composition (a component dropped, two components' weights swapped, every weight 1) misses by far.
    weights = {**MIXED_CONFIG["weights"], "cls": 0.2}
    wrong = [{**weights, name: 0.0} for name in weights]
    wrong += [{**weights, a: weights[b], b: weights[a]} for a in weights for b in weights if a < b]
    wrong += [dict.fromkeys(weights, 1.0)]
    for bad in wrong:
        assert abs(sum(bad[name] * ref[name] for name in ref) - expected) > 100 * RTOL * expected, bad


def test_make_loss_defaults_are_seed_focal_plus_dice():
    logits, targets = _batch(seed=11)
    loss, parts = losses.make_loss()(logits, targets)
    assert set(parts) == {"focal", "dice"}
    expected = 1.0 * _torchvision_focal(logits, targets, alpha=0.3, gamma=3.5) + 1.0 * _smp_per_image_dice(
        logits, targets, smooth=1.0
    )
    assert float(loss) == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"weights": {"dice": 1.0, "lovasz": 1.0}}, "lovasz"),
        ({"focal_gama": 2.0}, "focal_gama"),
        ({"weights": {}}, "no component"),
    ],
)
def test_make_loss_rejects_unknown_names(config, message):
    with pytest.raises(ValueError, match=message):
        losses.make_loss(config)


def test_make_loss_with_class_weight_needs_class_inputs():
    logits, targets = _batch()
    with pytest.raises(ValueError, match="class_logits"):
        losses.make_loss({"cls_weight": 1.0})(logits, targets)


def test_gradients_are_finite_and_float32_for_bf16_inputs():
    logits, targets = _batch(seed=12)
    logits[0, :4, :4] = 60.0  # saturated pixels
    loss_fn = losses.make_loss({"weights": {"bce": 1.0, "dice": 1.0, "focal": 1.0, "wsd": 1.0}, "cls_weight": 1.0})
    class_logits = jnp.asarray([[3.0], [-2.0], [0.0]], jnp.bfloat16)

    def total(mask_logits, class_logits):
        return loss_fn(mask_logits, jnp.asarray(targets, jnp.bfloat16), class_logits, jnp.array([1, 0, 1]))[0]

    loss, grads = jax.value_and_grad(total, argnums=(0, 1))(jnp.asarray(logits, jnp.bfloat16), class_logits)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)
