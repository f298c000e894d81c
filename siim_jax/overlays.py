"""Pictures of predictions: contours drawn on the radiograph, and a contact sheet of the best and worst cases.

Predicted contours are red, true contours green. Images are RGB uint8 arrays; files are PNG. ImageIds become
file names through `safe_file_name` (`unique_file_name` when names may repeat), which can never leave the output
folder.
"""

from __future__ import annotations

import heapq
import re
from pathlib import Path

import cv2
import numpy as np

PRED_COLOUR = (255, 0, 0)
TRUE_COLOUR = (0, 255, 0)
OVERLAY_SIZE = 512
TILE_SIZE = 256
SHEET_NAME = "contact_sheet.png"
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


class OverlayWriter:
    """Writes one overlay PNG per selected image into `out_dir` and, for labelled images, keeps the `sheet_size`
    best and worst by Dice for `finish()` to lay out in a contact sheet.

    Images whose truth and prediction are both empty (Dice 1 by convention, and nothing to see) are left out
    of the sheet. `selected(index)` says whether image `index` gets a PNG: all images unless `sample` is given.
    """

    def __init__(self, out_dir, sample: set[int] | None = None, sheet_size: int = 8, size: int = OVERLAY_SIZE):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.sample = sample
        self.sheet_size = sheet_size
        self.size = size
        self.written: list[Path] = []
        self._names: set[str] = set()
        self._best: list = []  # min-heap on (dice, -index): its root is the worst of the best
        self._worst: list = []  # min-heap on (-dice, index): its root is the best of the worst

    def selected(self, index: int) -> bool:
        return self.sample is None or index in self.sample

    def add(self, index: int, image_id: str, grey, pred_mask, true_mask=None, dice: float | None = None) -> None:
        if self.selected(index):
            path = self.out_dir / unique_file_name(image_id, self._names)
            write_png(path, render_overlay(grey, pred_mask, true_mask, self.size))
            self.written.append(path)
        if dice is not None and self.sheet_size > 0 and (np.any(pred_mask) or np.any(true_mask)):
            # Drawn at the tile's size, so that its contours stay one crisp pixel wide.
            case = (render_overlay(grey, pred_mask, true_mask, TILE_SIZE), f"{dice:.3f} {image_id[-24:]}")
            _push_bounded(self._best, (dice, -index), case, self.sheet_size)
            _push_bounded(self._worst, (-dice, index), case, self.sheet_size)

    def sheet_cases(self) -> tuple[list, list]:
        """(best, worst): the kept (thumbnail, caption) cases, best first and worst first."""
        best = [case for _, case in sorted(self._best, key=lambda item: item[0], reverse=True)]
        worst = [case for _, case in sorted(self._worst, key=lambda item: item[0], reverse=True)]
        return best, worst

    def finish(self) -> Path | None:
        """Writes the contact sheet (when any labelled case was added) and returns its path."""
        if not self._best:
            return None
        best, worst = self.sheet_cases()
        path = self.out_dir / SHEET_NAME
        write_png(path, contact_sheet([("best by Dice", best), ("worst by Dice", worst)]))
        return path


def _push_bounded(heap: list, key: tuple, case, limit: int) -> None:
    """Keeps the `limit` largest keys in the min-heap `heap` of (key, case)."""
    item = (key, case)
    if len(heap) < limit:
        heapq.heappush(heap, item)
    elif key > heap[0][0]:
        heapq.heapreplace(heap, item)
