"""Property-based tests, beside the ones in test_rle.py and test_postprocess.py: the RLE codecs on thin and
large images and on raw (gap, length) runs, the label parser over the header and whitespace variants it accepts,
and the post-processing rules against an independent connected-components oracle (scipy)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from siim_jax.data import labels, rle
from siim_jax.inference.postprocess import PostProcess

# ---------------------------------------------------------------------------------------------------- RLE

shapes = st.one_of(
    st.tuples(st.just(1024), st.integers(1, 3)),  # a column or three of a full-height image
    st.tuples(st.integers(1, 3), st.just(1024)),  # a row or three
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.just((1024, 1024)),
)


@st.composite
def raw_runs(draw, size: int, max_runs: int = 30) -> list[tuple[int, int]]:
    """(gap, length) pairs of a relative RLE that fits `size` pixels: gaps may be 0 (touching runs)."""
    step = max(1, size // 8)
    pairs = draw(st.lists(st.tuples(st.integers(0, step), st.integers(1, step)), max_size=max_runs))
    fitting, end = [], 0
    for gap, length in pairs:
        if end + gap + length > size:
            break
        fitting.append((gap, length))
        end += gap + length
    return fitting


def relative_text(pairs: list[tuple[int, int]]) -> str:
    return " ".join(f"{gap} {length}" for gap, length in pairs) or rle.EMPTY


def painted(pairs: list[tuple[int, int]], height: int, width: int) -> np.ndarray:
    """The mask of relative runs painted by slicing a column-major pixel vector: an oracle for `rle.decode`."""
    flat, end = np.zeros(height * width, bool), 0
    for gap, length in pairs:
        flat[end + gap : end + gap + length] = True
        end += gap + length
    return flat.reshape(width, height).T


@st.composite
def shaped_runs(draw, rows: int = 1):
    height, width = draw(shapes)
    return height, width, [draw(raw_runs(height * width)) for _ in range(rows)]


@settings(max_examples=100, deadline=None)
@given(shaped_runs())
def test_decode_paints_column_major_runs_and_encode_inverts_it(case):
    height, width, (pairs,) = case
    mask = painted(pairs, height, width)
    np.testing.assert_array_equal(rle.decode(relative_text(pairs), height, width), mask)
    encoded = rle.encode(mask)
    np.testing.assert_array_equal(rle.decode(encoded, height, width), mask)
    np.testing.assert_array_equal(rle.decode_standard(rle.encode_standard(mask), height, width), mask)
    values = np.array(encoded.split() if mask.any() else [], int)
    assert (values[1::2] > 0).all() and (values[2::2] > 0).all()  # canonical: no empty runs, touching ones merged
    assert rle.encode(rle.decode(encoded, height, width)) == encoded


@settings(max_examples=150, deadline=None)
@given(shaped_runs())
def test_standard_starts_are_the_relative_runs_absolute_starts_plus_one(case):
    height, width, (pairs,) = case
    mask = painted(pairs, height, width)
    starts, ends = rle.relative_runs(rle.encode(mask))
    expected = " ".join(f"{start + 1} {end - start}" for start, end in zip(starts.tolist(), ends.tolist()))
    assert rle.encode_standard(mask) == (expected or rle.EMPTY)


@settings(max_examples=100, deadline=None)
@given(shaped_runs(rows=4))
def test_rows_of_one_image_merge_with_or_and_their_area_counts_each_pixel_once(case):
    height, width, rows = case
    texts = [relative_text(pairs) for pairs in rows]
    expected = np.logical_or.reduce([painted(pairs, height, width) for pairs in rows])
    np.testing.assert_array_equal(rle.decode_merged(texts, height, width), expected)
    frame = pd.DataFrame({labels.IMAGE_ID: "1.2.3", labels.ENCODED_PIXELS: texts})
    (image,) = labels.per_image(frame, (height, width)).itertuples()
    assert image.area == expected.sum() and image.positive == expected.any()


@settings(max_examples=100, deadline=None)
@given(shaped_runs(), st.integers(1, 50))
def test_a_run_past_the_image_is_refused_naming_the_image(case, overshoot):
    height, width, (pairs,) = case
    end = sum(gap + length for gap, length in pairs)
    text = relative_text([*pairs, (height * width - end, overshoot)])
    try:
        rle.decode(text, height, width, image_id="1.2.9")
    except rle.RLEError as error:
        assert "past the" in str(error) and "1.2.9" in str(error)
    else:
        raise AssertionError(f"{text!r} decoded in a {height}x{width} image")

# ---------------------------------------------------------------------------------------------------- label files

HEADERS = [("ImageId", "EncodedPixels"), ("fname", "mask"), ("imageid", "encodedpixels"), ("IMAGEID", "EncodedPixels")]
blanks = st.text(alphabet=" ", max_size=3)
image_ids = st.from_regex(r"\A1\.2\.[0-9]{1,6}(\.[0-9]{1,4}){0,3}\Z")


@st.composite
def label_rows(draw) -> list[tuple[str, str]]:
    rows = []
    for image_id in draw(st.lists(image_ids, min_size=1, max_size=8)):
        pairs = draw(raw_runs(1024 * 1024, max_runs=6))
        rows.append((image_id, draw(st.sampled_from([relative_text(pairs), rle.EMPTY, ""]))))
    return rows


def _field(draw, value: str) -> str:
    """A field as some writer might put it: quoted, or padded with spaces."""
    return f'"{value}"' if draw(st.booleans()) else f"{draw(blanks)}{value}{draw(blanks)}"


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    rows=label_rows(),
    header=st.sampled_from(HEADERS),
    newline=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
    final_newline=st.booleans(),
)
def test_label_files_parse_to_their_rows_whatever_the_header_spacing_and_line_ends(
    tmp_path_factory, data, rows, header, newline, bom, final_newline
):
    lines = [",".join(_field(data.draw, name) for name in header)]
    lines += [f"{_field(data.draw, image_id)},{_field(data.draw, encoded)}" for image_id, encoded in rows]
    text = newline.join(lines) + (newline if final_newline else "")
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    frame = labels.read_labels(path)
    assert list(frame.columns) == [labels.IMAGE_ID, labels.ENCODED_PIXELS]
    assert list(frame[labels.IMAGE_ID]) == [image_id for image_id, _ in rows]
    assert list(frame[labels.ENCODED_PIXELS]) == [encoded or rle.EMPTY for _, encoded in rows]

# ---------------------------------------------------------------------------------------------------- post-processing

prob_maps = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    elements=st.sampled_from([0.0, 0.2, 0.45, 0.6, 0.8, 1.0]),
)
levels = st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9])
EIGHT_CONNECTED = np.ones((3, 3), bool)


def components_at_least(mask: np.ndarray, min_area: int) -> np.ndarray:
    """The 8-connected components of `mask` with at least `min_area` pixels (scipy's labelling, not cv2's)."""
    labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    areas = np.bincount(labelled.ravel(), minlength=count + 1)
    areas[0] = 0
    return areas[labelled] >= max(min_area, 1)


rules = st.builds(
    PostProcess,
    mode=st.sampled_from(["threshold", "triplet"]),
    threshold=levels,
    top_threshold=levels,
    min_area=st.integers(0, 6),
    bottom_threshold=levels,
    min_component_area=st.integers(0, 6),
    class_threshold=st.one_of(st.none(), levels),
)


@settings(max_examples=300, deadline=None)
@given(prob_maps, rules, st.floats(0, 1))
def test_post_processing_follows_its_three_rules(prob, rule, class_prob):
    mask = rule.apply(prob, class_prob)
    assert mask.dtype == bool and mask.shape == prob.shape
    gated = rule.class_threshold is not None and class_prob < rule.class_threshold
    too_small = rule.mode == "triplet" and np.count_nonzero(prob > rule.top_threshold) < rule.min_area
    if gated or too_small:
        assert not mask.any()
    else:
        expected = components_at_least(prob > rule.binarise_threshold, rule.min_component_area)
        np.testing.assert_array_equal(mask, expected)


@settings(max_examples=150, deadline=None)
@given(prob_maps, rules.filter(lambda rule: rule.class_threshold is None))
def test_post_processing_commutes_with_flips_and_transposition(prob, rule):
    mask = rule.apply(prob)
    for move in (np.flipud, np.fliplr, np.transpose):
        np.testing.assert_array_equal(rule.apply(np.ascontiguousarray(move(prob))), move(mask))


@settings(max_examples=150, deadline=None)
@given(prob_maps, levels, st.integers(0, 8), st.integers(0, 8))
def test_a_larger_minimum_component_area_never_adds_pixels(prob, threshold, first, second):
    small, large = sorted((first, second))
    kept_small = PostProcess(threshold=threshold, min_component_area=small).apply(prob)
    kept_large = PostProcess(threshold=threshold, min_component_area=large).apply(prob)
    assert not np.any(kept_large & ~kept_small)
