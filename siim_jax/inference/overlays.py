"""Overlays of predictions: one PNG per selected image, and a contact sheet of the best and worst cases."""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np

from siim_jax.pictures import OVERLAY_SIZE, TILE_SIZE, contact_sheet, render_overlay, unique_file_name, write_png

SHEET_NAME = "contact_sheet.png"


def overlay_sample(n_images: int, count: int, seed: int = 0) -> set[int] | None:
    """Indices of the images to draw: all (None) when count is 0, else a seeded sample of `count`."""
    if count <= 0 or count >= n_images:
        return None
    return set(np.random.default_rng(seed).choice(n_images, size=count, replace=False).tolist())


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
