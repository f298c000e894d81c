import itertools

import jax
import numpy as np
import pytest

from siim_jax import metrics

from .conftest import reference_import
from .helpers import challenge_dice, square

EMPTY = np.zeros((8, 8), bool)
# 4x4 square against a 4x4 square shifted by two columns: |X∩Y| = 8, |X| = |Y| = 16.
PRED, TRUTH = square(8, 0, 0, 4), square(8, 0, 2, 4)


@pytest.mark.parametrize(
    "pred,truth,dice,iou",
    [
        (EMPTY, EMPTY, 1.0, 1.0),
        (EMPTY, TRUTH, 0.0, 0.0),
        (PRED, EMPTY, 0.0, 0.0),
        (PRED, TRUTH, 0.5, 1 / 3),
        (TRUTH, TRUTH, 1.0, 1.0),
    ],
)
def test_hand_made_cases(pred, truth, dice, iou):
    stats = metrics.per_image_stats(pred[None, ..., None].astype(np.float32), truth[None, ..., None])
    areas = (stats["intersection"], stats["pred_area"], stats["true_area"])
    assert metrics.dice_from_areas(*areas)[0] == pytest.approx(dice)
    assert metrics.iou_from_areas(*areas)[0] == pytest.approx(iou)
    assert challenge_dice(pred[None], truth[None]) == pytest.approx(dice)


def test_challenge_dice_averages_over_images():
    got = challenge_dice(np.stack([EMPTY, PRED, PRED]), np.stack([EMPTY, TRUTH, EMPTY]))
    assert got == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_per_image_stats_thresholds_strictly_and_uses_class_probs():
    probs = np.array([[[0.5, 0.7], [0.2, 0.9]]], np.float32)[..., None]
    masks = np.array([[[1, 1], [0, 0]]], np.uint8)[..., None]
    stats = metrics.per_image_stats(probs, masks, 0.5)
    assert {k: float(stats[k][0]) for k in metrics.STAT_NAMES} == {
        "intersection": 1.0, "pred_area": 2.0, "true_area": 2.0, "score": pytest.approx(0.9)
    }
    # counted by hand at the bottom thresholds 0.3, 0.4, 0.5, 0.6 and the top thresholds 0.5, 0.7, 0.9
    assert metrics.PP_BOTTOM_THRESHOLDS == (0.3, 0.4, 0.5, 0.6) and metrics.PP_TOP_THRESHOLDS == (0.5, 0.7, 0.9)
    np.testing.assert_array_equal(stats["pp_intersection"][0], [2, 2, 1, 1])
    np.testing.assert_array_equal(stats["pp_pred_area"][0], [3, 3, 2, 2])
    np.testing.assert_array_equal(stats["top_count"][0], [2, 1, 0])
    assert float(stats["n_pixels"][0]) == 4
    assert float(metrics.per_image_stats(probs, masks, 0.5, class_probs=np.array([[0.25]]))["score"][0]) == 0.25


def _brute_force_auc(scores, labels):
    pairs = list(itertools.product(scores[labels], scores[~labels]))
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])


def _random_scores(seed, n=60):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, n) / 5.0  # many ties
    labels = rng.random(n) < 0.4
    return scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_count(seed):
    scores, labels = _random_scores(seed)
    assert metrics.roc_auc(scores, labels) == pytest.approx(_brute_force_auc(scores, labels))


def test_auc_matches_sklearn():
    sklearn_metrics = reference_import("sklearn.metrics")
    scores, labels = _random_scores(3)
    assert metrics.roc_auc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))


def test_auc_is_nan_with_one_class():
    assert np.isnan(metrics.roc_auc([0.1, 0.9], [True, True]))


def _random_batch(seed, n=10, size=12):
    rng = np.random.default_rng(seed)
    probs = rng.random((n, size, size, 1)).astype(np.float32) ** 3
    masks = rng.random((n, size, size, 1)) < 0.2
    masks[: n // 2] = False  # half the images have empty truth
    return probs, masks


def test_accumulating_uneven_batches_equals_one_batch():
    probs, masks = _random_batch(seed=4)
    stats_fn = jax.jit(metrics.per_image_stats)
    whole = metrics.MetricAccumulator()
    whole.add(stats_fn(probs, masks, 0.5))
    split = metrics.MetricAccumulator()
    for part in np.split(np.arange(len(probs)), [3, 4]):  # batches of 3, 1 and 6 images
        split.add(stats_fn(probs[part], masks[part], 0.5))
    assert split.summarise() == pytest.approx(whole.summarise())
    assert whole.summarise()["n_images"] == 10


def test_padding_rows_are_ignored():
    probs, masks = _random_batch(seed=5, n=6)
    expected = metrics.MetricAccumulator()
    expected.add(metrics.per_image_stats(probs[:4], masks[:4]))
    padded = metrics.MetricAccumulator()
    padded.add(metrics.per_image_stats(probs, masks), valid=np.arange(6) < 4)
    assert padded.summarise() == pytest.approx(expected.summarise())


def test_summary_values_match_direct_computation():
    probs, masks = _random_batch(seed=6)
    masks = masks[..., 0]
    pred = probs[..., 0] > 0.5
    accumulator = metrics.MetricAccumulator()
    accumulator.add(metrics.per_image_stats(probs[..., 0], masks))
    summary = accumulator.summarise()
    positive = masks.any(axis=(1, 2))
    assert summary["dice"] == pytest.approx(challenge_dice(pred, masks))
    assert summary["dice_positive"] == pytest.approx(challenge_dice(pred[positive], masks[positive]))
    assert summary["auc"] == pytest.approx(_brute_force_auc(probs.reshape(len(probs), -1).max(1), positive))
    assert summary["dice_gated"] == summary["dice"]  # the score is the top pixel probability: the same verdict


def test_gated_dice_empties_the_masks_the_class_head_calls_negative():
    probs, masks = _random_batch(seed=7)
    probs, masks = probs[..., 0], masks[..., 0]
    class_probs = np.random.default_rng(7).uniform(size=len(probs)).astype(np.float32)
    accumulator = metrics.MetricAccumulator()
    accumulator.add(metrics.per_image_stats(probs, masks, class_probs=class_probs))
    gated = (probs > 0.5) & (class_probs >= 0.5)[:, None, None]
    assert 0 < (class_probs >= 0.5).sum() < len(probs)
    assert accumulator.summarise()["dice_gated"] == pytest.approx(challenge_dice(gated, masks))


def test_postprocessed_dice_is_the_best_of_the_same_grid_in_the_tuning_code():
    """'dice_pp' against `postprocess.grid_search` over the same triplet rules and class gates (another
    implementation: masks, connected components and counts per image). Blobs of a few pixels at 64² put the
    images on both sides of the scaled minimum areas (2 to 16 pixels)."""
    from siim_jax.inference.postprocess import grid_search

    rng = np.random.default_rng(8)
    size, n = 64, 16
    probs = rng.random((n, size, size)).astype(np.float32) * 0.45  # background below every bottom threshold but 0.3
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        side = int(rng.integers(1, 6))
        top, left = rng.integers(0, size - side, 2)
        probs[i, top : top + side, left : left + side] = rng.uniform(0.35, 1.0)
        if i % 2:
            masks[i, top : top + side + 1, left : left + side] = True
    class_probs = rng.uniform(size=n).astype(np.float32)
    accumulator = metrics.MetricAccumulator()
    accumulator.add(metrics.per_image_stats(probs, masks, class_probs=class_probs))
    grid = {
        "mode": ["triplet"],
        "top_threshold": list(metrics.PP_TOP_THRESHOLDS),
        "min_area": [round(area * (size / 1024) ** 2) for area in metrics.PP_MIN_AREAS_1024],
        "bottom_threshold": list(metrics.PP_BOTTOM_THRESHOLDS),
        "class_threshold": list(metrics.PP_CLASS_THRESHOLDS),
    }
    best = grid_search(probs, masks, grid, class_probs)[0][1]
    assert accumulator.summarise()["dice_pp"] == pytest.approx(best, abs=1e-12)
    assert best > accumulator.summarise()["dice"]  # the grid matters on these images
