import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from siim_jax import losses


def _batch(seed=0, shape=(3, 16, 16, 1), positive_rate=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, shape).astype(np.float32)
    targets = (rng.random(shape) < positive_rate).astype(np.float32)
    return logits, targets


def _nchw(x):
    """NHWC numpy -> NCHW torch tensor; skips the test without torch."""
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.3, 3.5), (0.8, 0.5)])
def test_focal_matches_torchvision(alpha, gamma):
    ops = pytest.importorskip("torchvision.ops")
    logits, targets = _batch()
    expected = ops.sigmoid_focal_loss(_nchw(logits), _nchw(targets), alpha, gamma, reduction="mean")
    assert float(losses.sigmoid_focal_loss(logits, targets, alpha, gamma)) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_focal_matches_smp(alpha):
    smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
    logits, targets = _batch(seed=1)
    expected = smp_losses.FocalLoss("binary", alpha=alpha, gamma=3.5)(_nchw(logits), _nchw(targets))
    assert float(losses.sigmoid_focal_loss(logits, targets, alpha, 3.5)) == pytest.approx(float(expected), rel=1e-5)


def test_bce_matches_torch():
    torch = pytest.importorskip("torch")
    logits, targets = _batch(seed=2)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(targets))
    assert float(losses.bce_with_logits(logits, targets)) == pytest.approx(float(expected), rel=1e-5)


def _smp_dice(smooth):
    # smp 0.6 scores (I + s) / ((sum p + sum y) / 2 + s): its smooth s is our 2 s.
    smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
    return smp_losses.DiceLoss("binary", smooth=smooth / 2, eps=0.0)


@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_batch_dice_matches_smp(smooth):
    logits, targets = _batch(seed=3)
    expected = _smp_dice(smooth)(_nchw(logits), _nchw(targets))
    got = losses.soft_dice_loss(logits, targets, smooth=smooth, per_image=False)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_per_image_dice_matches_smp_image_by_image():
    logits, targets = _batch(seed=4)  # every image has positive pixels, so smp does not zero any
    dice = _smp_dice(1.0)
    expected = np.mean([float(dice(_nchw(logits[i : i + 1]), _nchw(targets[i : i + 1]))) for i in range(len(logits))])
    assert float(losses.soft_dice_loss(logits, targets, smooth=1.0)) == pytest.approx(expected, rel=1e-5)


def test_per_image_dice_counts_empty_truth_images():
    logits, targets = _batch(seed=5)
    targets[0] = 0.0
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    ratios = [(2 * (pi * ti).sum() + 1.0) / (pi.sum() + ti.sum() + 1.0) for pi, ti in zip(p, targets)]
    assert float(losses.soft_dice_loss(logits, targets)) == pytest.approx(1.0 - np.mean(ratios), rel=1e-5)


def _wsd_reference(logits, targets, v1, v2, s):
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    values = []
    for pi, yi in zip(p, targets.astype(np.float64)):
        w = v1 + (v2 - v1) * yi
        g, g_hat = w * (2 * yi - 1), w * (2 * pi - 1)
        values.append(1 - (2 * (g_hat * g).sum() + s) / ((g_hat**2).sum() + (g**2).sum() + s))
    return np.mean(values)


@pytest.mark.parametrize("v1,v2,s", [(0.1, 0.9, 1.0), (0.3, 0.7, 1e-6), (1.0, 1.0, 0.0)])
def test_weighted_soft_dice_matches_paper_formula(v1, v2, s):
    logits, targets = _batch(seed=6)
    targets[1] = 0.0
    got = losses.weighted_soft_dice_loss(logits, targets, v1, v2, s)
    assert float(got) == pytest.approx(_wsd_reference(logits, targets, v1, v2, s), rel=1e-5)


def test_weighted_soft_dice_is_zero_for_perfect_prediction():
    _, targets = _batch(seed=7)
    logits = np.where(targets > 0, 200.0, -200.0)  # sigmoid saturates to exactly 0 / 1 in float32
    assert float(losses.weighted_soft_dice_loss(logits, targets, 0.1, 0.9, 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_weighted_soft_dice_swapping_classes_and_weights_is_symmetric():
    # g and g_hat only change sign when foreground and background (and their weights) swap.
    logits, targets = _batch(seed=8)
    direct = losses.weighted_soft_dice_loss(logits, targets, 0.2, 0.8, 1.0)
    swapped = losses.weighted_soft_dice_loss(-logits, 1.0 - targets, 0.8, 0.2, 1.0)
    assert float(direct) == pytest.approx(float(swapped), rel=1e-5)


def test_classification_loss_flattens_head_logits():
    rng = np.random.default_rng(9)
    class_logits = rng.normal(size=(5, 1)).astype(np.float32)
    labels = np.array([1, 0, 0, 1, 1])
    expected = losses.bce_with_logits(class_logits[:, 0], labels.astype(np.float32))
    assert float(losses.classification_loss(class_logits, labels)) == pytest.approx(float(expected))


def test_mixed_loss_is_weighted_sum_of_components():
    logits, targets = _batch(seed=10)
    class_logits, labels = np.array([[0.5], [-1.0], [2.0]], np.float32), np.array([1, 0, 1])
    config = ml_collections.ConfigDict(
        {"weights": {"bce": 3.0, "dice": 1.0, "focal": 4.0, "wsd": 0.5}, "focal_alpha": 0.25, "cls_weight": 0.2}
    )
    loss, parts = jax.jit(losses.make_loss(config))(logits, targets, class_logits, labels)
    assert set(parts) == {"bce", "dice", "focal", "wsd", "cls"}
    assert float(parts["focal"]) == pytest.approx(float(losses.sigmoid_focal_loss(logits, targets, 0.25, 3.5)))
    expected = 3 * parts["bce"] + parts["dice"] + 4 * parts["focal"] + 0.5 * parts["wsd"] + 0.2 * parts["cls"]
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_make_loss_defaults_are_seed_focal_plus_dice():
    logits, targets = _batch(seed=11)
    loss, parts = losses.make_loss()(logits, targets)
    assert set(parts) == {"focal", "dice"}
    expected = losses.sigmoid_focal_loss(logits, targets, 0.3, 3.5) + losses.soft_dice_loss(logits, targets)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


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
