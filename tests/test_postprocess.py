import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from siim_jax.inference.postprocess import PostProcess, default_grid, expand_grid, grid_search

from .helpers import challenge_dice

# Two blobs: a 2x2 block of 0.9 (4 pixels) and a single 0.6 pixel, on a 0.1 background.
PROB = np.full((6, 6), 0.1, np.float32)
PROB[1:3, 1:3] = 0.9
PROB[4, 4] = 0.6
BLOCK = PROB == np.float32(0.9)


def test_threshold_is_strict():
    assert np.array_equal(PostProcess(threshold=0.6).apply(PROB), BLOCK)
    assert np.array_equal(PostProcess(threshold=0.5).apply(PROB), PROB > 0.5)


@pytest.mark.parametrize("min_area,expected_pixels", [(4, 5), (5, 0)])
def test_triplet_rule(min_area, expected_pixels):
    rule = PostProcess(mode="triplet", top_threshold=0.8, min_area=min_area, bottom_threshold=0.5)
    mask = rule.apply(PROB)
    assert mask.sum() == expected_pixels
    if expected_pixels:
        assert np.array_equal(mask, PROB > 0.5)


def test_small_components_removed_large_kept():
    rule = PostProcess(threshold=0.5, min_component_area=2)
    assert np.array_equal(rule.apply(PROB), BLOCK)


def test_components_are_8_connected():
    prob = np.zeros((4, 4), np.float32)
    prob[0, 0] = prob[1, 1] = prob[3, 3] = 1.0  # the diagonal pair is one component of area 2
    mask = PostProcess(min_component_area=2).apply(prob)
    assert mask.sum() == 2 and mask[0, 0] and mask[1, 1]


@pytest.mark.parametrize("class_prob,expected_pixels", [(0.39, 0), (0.4, 5)])
def test_class_gating(class_prob, expected_pixels):
    assert PostProcess(class_threshold=0.4).apply(PROB, class_prob).sum() == expected_pixels


def test_gating_without_class_prob_raises():
    with pytest.raises(ValueError, match="class"):
        PostProcess(class_threshold=0.5).apply(PROB)


def test_invalid_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        PostProcess(mode="otsu")


def test_json_round_trip(tmp_path):
    rule = PostProcess(mode="triplet", top_threshold=0.7, min_area=123, min_component_area=7, class_threshold=0.45)
    path = tmp_path / "postprocess.json"
    rule.to_json(path)
    assert PostProcess.from_json(path) == rule


def test_json_unknown_keys_are_named(tmp_path):
    path = tmp_path / "postprocess.json"
    path.write_text(json.dumps({"threshold": 0.5, "min_areaa": 10}))
    with pytest.raises(ValueError, match="min_areaa"):
        PostProcess.from_json(path)


def _constructed_case():
    """Only top 0.8, min_area 10, bottom 0.5 scores 1: every other setting of the grid errs somewhere.

    Positives: truth is prob > 0.5 over a background up to 0.45, with 16 pixels at 0.9.
    Negatives: a 20-pixel patch at 0.6 (only top 0.5 counts it) and 6 pixels at 0.9 (min_area 10 drops them).
    """
    rng = np.random.default_rng(0)
    probs, truths = [], []
    for i in range(12):
        prob = rng.uniform(0.0, 0.45, (16, 16)).astype(np.float32)
        if i % 2:
            prob[4:12, 4:12] = rng.uniform(0.55, 0.75, (8, 8))
            prob[4:8, 4:8] = 0.9
        else:
            prob[0:4, 0:5] = 0.6
            prob[10:12, 10:13] = 0.9
        probs.append(prob)
        truths.append(prob > 0.5 if i % 2 else np.zeros((16, 16), bool))
    return np.stack(probs), np.stack(truths)


def test_grid_search_finds_known_best():
    probs, truths = _constructed_case()
    grid = {"mode": ["triplet"], "top_threshold": [0.5, 0.8], "min_area": [5, 10], "bottom_threshold": [0.3, 0.5]}
    (best, dice), (_, runner_up) = grid_search(probs, truths, grid)[:2]
    assert (best.top_threshold, best.min_area, best.bottom_threshold) == (0.8, 10, 0.5)
    assert dice == pytest.approx(1.0) and runner_up < 1.0


def test_grid_search_scores_equal_applying_each_setting():
    rng = np.random.default_rng(1)
    probs = rng.random((5, 12, 12)).astype(np.float32) ** 2
    truths = rng.random((5, 12, 12)) < 0.15
    truths[0] = False
    class_probs = rng.random(5)
    grid = [
        {"threshold": [0.2, 0.5], "min_component_area": [0, 3], "class_threshold": [None, 0.5]},
        {"mode": ["triplet"], "top_threshold": [0.6, 0.9], "min_area": [1, 10], "bottom_threshold": [0.2, 0.4]},
    ]
    results = grid_search(probs, truths, grid, class_probs)
    assert len(results) == len(expand_grid(grid)) == 16
    assert [d for _, d in results] == sorted((d for _, d in results), reverse=True)
    for rule, dice in results:
        masks = np.stack([rule.apply(p, c) for p, c in zip(probs, class_probs)])
        assert dice == pytest.approx(challenge_dice(masks, truths))


def test_grid_rejects_unknown_fields():
    with pytest.raises(ValueError, match="treshold"):
        expand_grid({"treshold": [0.5]})


def test_default_grid_scales_areas():
    full, small = default_grid(1024), default_grid(256)
    assert max(full[1]["min_area"]) == 4000 and max(small[1]["min_area"]) == 250
    assert all(c.class_threshold is None for c in expand_grid(full))
    assert any(c.class_threshold is not None for c in expand_grid(default_grid(class_head=True)))


prob_maps = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
                       elements=st.floats(0, 1, width=32))
thresholds = st.floats(0, 1)


@settings(max_examples=40, deadline=None)
@given(prob_maps, thresholds, thresholds, st.integers(0, 4), st.sampled_from(["threshold", "triplet"]))
def test_higher_threshold_never_adds_pixels(prob, t1, t2, min_component_area, mode):
    low, high = sorted((t1, t2))
    fields = dict(mode=mode, min_area=2, top_threshold=0.5, min_component_area=min_component_area)
    low_mask = PostProcess(threshold=low, bottom_threshold=low, **fields).apply(prob)
    high_mask = PostProcess(threshold=high, bottom_threshold=high, **fields).apply(prob)
    for mask in (low_mask, high_mask):
        assert mask.dtype == bool and mask.shape == prob.shape
    assert not np.any(high_mask & ~low_mask)
