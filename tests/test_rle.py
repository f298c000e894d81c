import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from siim_jax.data import rle

from .conftest import REAL_LABELS


def _real_rows(siim_real):
    with gzip.open(REAL_LABELS, "rt") as handle:
        next(handle)
        return [line.rstrip("\n").split(",", 1) for line in handle]


def test_every_real_row_round_trips(siim_real):
    rows = _real_rows(siim_real)
    assert len(rows) == 12954
    for image_id, text in rows:
        mask = rle.decode(text, 1024, 1024, image_id=image_id)
        assert mask.shape == (1024, 1024) and mask.dtype == bool
        assert rle.encode(mask) == text, image_id


def test_multi_row_images_merge_with_or(siim_real):
    rows = {}
    for image_id, text in _real_rows(siim_real):
        rows.setdefault(image_id, []).append(text)
    multi = [ids for ids, texts in rows.items() if len(texts) > 1]
    overlapping = 0
    for image_id in multi:
        masks = [rle.decode(text) for text in rows[image_id]]
        expected = np.logical_or.reduce(masks)
        overlapping += int(sum(m.sum() for m in masks) > expected.sum())
        np.testing.assert_array_equal(rle.decode_merged(rows[image_id]), expected)
    assert overlapping == 183  # as counted in ../shared/siim-real/README.md


def test_relative_encoding_matches_the_challenge_definition():
    # Column-major numbering: pixel (row r, column c) of an HxW image has index c * H + r.
    mask = np.zeros((4, 3), bool)
    mask[1:3, 0] = True  # indices 1, 2
    mask[0, 1] = True  # index 4
    mask[3, 2] = True  # index 11
    assert rle.encode(mask) == "1 2 1 1 6 1"  # start 1 len 2; gap 4-3=1 len 1; gap 11-5=6 len 1
    assert rle.encode_standard(mask) == "2 2 5 1 12 1"
    np.testing.assert_array_equal(rle.decode("1 2 1 1 6 1", 4, 3), mask)
    np.testing.assert_array_equal(rle.decode_standard("2 2 5 1 12 1", 4, 3), mask)


def test_empty_mask_is_minus_one():
    assert rle.encode(np.zeros((5, 5), bool)) == "-1"
    assert rle.encode_standard(np.zeros((5, 5), bool)) == "-1"
    assert not rle.decode("-1", 5, 5).any()
    assert not rle.decode(" -1 ", 5, 5).any()


def test_full_mask():
    mask = np.ones((3, 2), bool)
    assert rle.encode(mask) == "0 6"
    np.testing.assert_array_equal(rle.decode("0 6", 3, 2), mask)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("1 2 3", "odd number"),
        ("1 -2", "negative"),
        ("1 x", "non-numeric"),
        ("1.5 2", "non-numeric"),
        ("20 10", "past the"),
        ("0 20 5 1", "past the"),
    ],
)
def test_malformed_strings_name_the_image(text, reason):
    with pytest.raises(rle.RLEError, match=reason) as info:
        rle.decode(text, 5, 5, image_id="img-7")
    assert "img-7" in str(info.value)


def test_standard_rle_is_one_based():
    with pytest.raises(rle.RLEError, match="1-based"):
        rle.decode_standard("0 3", 5, 5)


masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda shape: hnp.arrays(bool, shape, elements=st.booleans())
)


@settings(max_examples=200, deadline=None)
@given(masks)
def test_random_masks_round_trip(mask):
    height, width = mask.shape
    np.testing.assert_array_equal(rle.decode(rle.encode(mask), height, width), mask)
    np.testing.assert_array_equal(rle.decode_standard(rle.encode_standard(mask), height, width), mask)


@settings(max_examples=100, deadline=None)
@given(st.lists(hnp.arrays(bool, (7, 5), elements=st.booleans()), min_size=1, max_size=4))
def test_merge_is_or(parts):
    merged = rle.decode_merged([rle.encode(part) for part in parts], 7, 5)
    np.testing.assert_array_equal(merged, np.logical_or.reduce(parts))
