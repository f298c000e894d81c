"""Pictures of masks: contours drawn on the radiograph, contact sheets of captioned tiles, PNG files.

Predicted contours are red, true contours green. Images are RGB uint8 arrays; files are PNG. ImageIds become
file names through `safe_file_name` (`unique_file_name` when names may repeat), which can never leave the output
folder. Training draws its validation sheet with these, and `inference.overlays` its per-image overlays.
"""

from __future__ import annotations

import re

import cv2
import numpy as np

PRED_COLOUR = (255, 0, 0)
TRUE_COLOUR = (0, 255, 0)
OVERLAY_SIZE = 512
TILE_SIZE = 256
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME = 200


def safe_file_name(image_id: str, suffix: str = ".png") -> str:
    """A file name for `image_id` without path separators, '..' or a leading dot: always a plain child name."""
    name = _UNSAFE.sub("_", str(image_id))
    name = re.sub(r"\.{2,}", "_", name).lstrip(".")[:_MAX_NAME]
    return (name or "_") + suffix


def unique_file_name(image_id: str, taken: set[str], suffix: str = ".png") -> str:
    """`safe_file_name(image_id, suffix)`, numbered -2, -3, ... while the name is in `taken`; the name joins `taken`."""
    name = safe_file_name(image_id, suffix)
    stem, count = name[: -len(suffix)], 1
    while name in taken:
        count += 1
        name = f"{stem}-{count}{suffix}"
    taken.add(name)
    return name


def _scaled_size(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """(width, height) with the longer side equal to `size`."""
    height, width = shape
    scale = size / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _draw_contours(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], thickness: int) -> None:
    # Resize the mask as an image (area average), so thin structures survive downscaling as long as they
    # cover half a pixel.
    small = cv2.resize(mask.astype(np.float32), canvas.shape[1::-1], interpolation=cv2.INTER_AREA) >= 0.5
    contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(canvas, contours, -1, colour, thickness)


def render_overlay(
    grey: np.ndarray,
    pred_mask: np.ndarray | None,
    true_mask: np.ndarray | None = None,
    size: int = OVERLAY_SIZE,
    thickness: int = 1,
) -> np.ndarray:
    """RGB uint8 picture of the grey image (longer side `size`) with the true (green) and predicted (red)
    contours; masks are at the grey image's resolution. The true contour is one pixel thicker, so that it
    still shows beside the red one where both coincide."""
    small = cv2.resize(np.asarray(grey, np.uint8), _scaled_size(grey.shape, size), interpolation=cv2.INTER_AREA)
    canvas = np.ascontiguousarray(np.repeat(small[:, :, None], 3, axis=2))
    for mask, colour, width in ((true_mask, TRUE_COLOUR, thickness + 1), (pred_mask, PRED_COLOUR, thickness)):
        if mask is not None:
            _draw_contours(canvas, np.asarray(mask, bool), colour, width)
    return canvas


def write_png(path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def _tile(rgb: np.ndarray, caption: str, size: int) -> np.ndarray:
    """`rgb` fitted into a black size x size square, with the caption written along its top."""
    tile = np.zeros((size, size, 3), np.uint8)
    width, height = _scaled_size(rgb.shape[:2], size)
    tile[:height, :width] = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    cv2.putText(tile, caption, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
    return tile


def contact_sheet(rows: list[tuple[str, list[tuple[np.ndarray, str]]]], tile_size: int = TILE_SIZE) -> np.ndarray:
    """A sheet with one titled row per (title, [(picture, caption), ...]); short rows are padded with black."""
    columns = max([len(tiles) for _, tiles in rows] + [1])
    title_height = 24
    bands = []
    for title, tiles in rows:
        band = np.zeros((title_height + tile_size, columns * tile_size, 3), np.uint8)
        cv2.putText(band, title, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
        for column, (rgb, caption) in enumerate(tiles):
            band[title_height:, column * tile_size : (column + 1) * tile_size] = _tile(rgb, caption, tile_size)
        bands.append(band)
    return np.concatenate(bands, axis=0)
