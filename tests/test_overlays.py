import numpy as np
import pytest

from siim_jax.inference.overlays import SHEET_NAME, OverlayWriter
from siim_jax.pictures import PRED_COLOUR, TILE_SIZE, TRUE_COLOUR, contact_sheet, render_overlay, safe_file_name

from .helpers import read_png


@pytest.mark.parametrize(
    "image_id",
    ["../../etc/passwd", "..", ".", "", "a/b\\c", "/abs/path", "..\\..\\x", "....", ".hidden", "x" * 500, "id\x00nul"],
)
def test_file_names_never_leave_the_folder(tmp_path, image_id):
    name = safe_file_name(image_id)
    assert "/" not in name and "\\" not in name and ".." not in name and not name.startswith(".")
    assert len(name) <= 210 and name.endswith(".png")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_challenge_ids_keep_their_names():
    image_id = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
    assert safe_file_name(image_id) == image_id + ".png"
    assert safe_file_name("ID_0011fe81e") == "ID_0011fe81e.png"


def _colour_pixels(picture, colour):
    return np.all(picture == colour, axis=-1)


def test_contours_are_drawn_in_their_colours_on_the_downscaled_grey_image():
    grey = np.full((200, 100), 90, np.uint8)
    pred = np.zeros((200, 100), bool)
    pred[20:80, 20:60] = True
    truth = np.zeros((200, 100), bool)
    truth[120:180, 40:90] = True
    picture = render_overlay(grey, pred, truth, size=100)
    assert picture.shape == (100, 50, 3) and picture.dtype == np.uint8
    red, green = _colour_pixels(picture, PRED_COLOUR), _colour_pixels(picture, TRUE_COLOUR)
    assert red[10:40].any() and not red[60:].any() and green[60:90].any() and not green[:50].any()
    # contours only: the inside of a region stays grey
    assert tuple(picture[25, 20]) == (90, 90, 90) and tuple(picture[75, 32]) == (90, 90, 90)
    assert not (red | green)[[0, 99]].any()


def test_contact_sheet_layout():
    tiles = [(np.full((40, 20, 3), value, np.uint8), f"case {value}") for value in (50, 100, 150)]
    sheet = contact_sheet([("best", tiles), ("worst", tiles[:1])], tile_size=64)
    assert sheet.shape == (2 * (24 + 64), 3 * 64, 3)
    assert (sheet[24 + 40, 64 + 5] == 100).all()  # second tile of the first row, below its caption
    assert (sheet[2 * 24 + 64 + 40, 64 + 5] == 0).all()  # the short second row is padded with black


def test_writer_keeps_the_best_and_worst_cases_and_skips_empty_ones(tmp_path):
    writer = OverlayWriter(tmp_path, sample=set(), sheet_size=2, size=64)
    grey = np.zeros((64, 64), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:30] = True
    for index, dice in enumerate([0.1, 0.9, 0.5, 0.7, 0.0]):
        writer.add(index, f"image-{index}", grey + 10 * index, mask, mask, dice)
    writer.add(5, "empty", grey, np.zeros_like(mask), np.zeros_like(mask), 1.0)
    assert writer.written == []
    best, worst = writer.sheet_cases()
    assert [caption for _, caption in best] == ["0.900 image-1", "0.700 image-3"]
    assert [caption for _, caption in worst] == ["0.000 image-4", "0.100 image-0"]
    sheet = read_png(writer.finish())
    assert sheet.shape == (2 * (24 + TILE_SIZE), 2 * TILE_SIZE, 3)
    assert (tmp_path / SHEET_NAME).exists()


def test_writer_names_colliding_ids_apart(tmp_path):
    writer = OverlayWriter(tmp_path, size=32)
    grey = np.zeros((32, 32), np.uint8)
    for image_id in ("a/b", "a\\b", "a_b"):
        writer.add(0, image_id, grey, None)
    assert [path.name for path in writer.written] == ["a_b.png", "a_b-2.png", "a_b-3.png"]
    assert all(path.parent == tmp_path for path in writer.written)
