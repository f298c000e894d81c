"""Host-side post-processing of probability maps into masks, and its tuning on validation data.

Pixels count as predicted when prob > threshold (strictly). Rules, applied in this order:
  1. gating: the image is empty if class_threshold is set and the class probability < class_threshold;
  2. 'triplet' mode (the challenge winner's rule): the image is empty if fewer than min_area pixels
     have prob > top_threshold; otherwise it is binarised at bottom_threshold.
     'threshold' mode binarises at threshold;
  3. connected components (8-connectivity) smaller than min_component_area pixels are removed.
Areas are in pixels of the probability map they are applied to; retune when its resolution changes.
"""

import dataclasses
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from siim_jax.metrics import dice_from_areas

MODES = ("threshold", "triplet")


@dataclasses.dataclass(frozen=True)
class PostProcess:
    """One post-processing setting (rules in the module docstring); fields a mode ignores keep defaults."""

    mode: str = "threshold"
    threshold: float = 0.5
    top_threshold: float = 0.75
    min_area: int = 2000
    bottom_threshold: float = 0.4
    min_component_area: int = 0
    class_threshold: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.min_area < 0 or self.min_component_area < 0:
            raise ValueError("min_area and min_component_area must be >= 0")

    @property
    def binarise_threshold(self) -> float:
        return self.threshold if self.mode == "threshold" else self.bottom_threshold

    def keeps_image(self, prob: np.ndarray, class_prob: float | None = None) -> bool:
        """False when gating or the triplet rule empties the image."""
        if self.class_threshold is not None:
            if class_prob is None:
                raise ValueError("class_threshold is set but no class probability was given")
            if class_prob < self.class_threshold:
                return False
        return self.mode != "triplet" or np.count_nonzero(prob > self.top_threshold) >= self.min_area

    def apply(self, prob, class_prob: float | None = None) -> np.ndarray:
        """Boolean mask of the probability map `prob` (H, W)."""
        prob = np.asarray(prob)
        if not self.keeps_image(prob, class_prob):
            return np.zeros(prob.shape, bool)
        mask = prob > self.binarise_threshold
        if self.min_component_area == 0:
            return mask
        labels, areas = _components(mask)
        return (areas >= self.min_component_area)[labels]

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path) -> "PostProcess":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, fields: Mapping) -> "PostProcess":
        _check_field_names(fields, f"{cls.__name__} fields")
        return cls(**fields)


def _check_field_names(names: Iterable[str], what: str) -> None:
    known = [f.name for f in dataclasses.fields(PostProcess)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {known}")


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component label image and areas, with the background (label 0) given area 0."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA].copy()
    areas[0] = 0
    return labels, areas


Grid = Mapping[str, Sequence] | Sequence[Mapping[str, Sequence]]


def default_grid(resolution: int = 1024, class_head: bool = False) -> list[dict[str, list]]:
    """A search grid for probability maps of `resolution`² pixels (areas scale from 1024²)."""

    def areas(values_at_1024):
        return sorted({round(v * (resolution / 1024) ** 2) for v in values_at_1024})

    shared = {
        "min_component_area": areas([0, 250, 1000]),
        "class_threshold": [None, 0.3, 0.4, 0.5, 0.6, 0.7] if class_head else [None],
    }
    return [
        {"mode": ["threshold"], "threshold": [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7], **shared},
        {
            "mode": ["triplet"],
            "top_threshold": [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9],
            "min_area": areas([0, 500, 1000, 2000, 3000, 4000]),
            "bottom_threshold": [0.2, 0.3, 0.4, 0.5],
            **shared,
        },
    ]


def expand_grid(grid: Grid) -> list[PostProcess]:
    """Every PostProcess of a grid: a mapping field -> candidate values, or a list of such mappings
    whose products are concatenated. Fields left out keep their defaults."""
    candidates = []
    for subgrid in [grid] if isinstance(grid, Mapping) else grid:
        _check_field_names(subgrid, "grid fields")
        names = list(subgrid)
        for values in itertools.product(*(subgrid[name] for name in names)):
            candidates.append(PostProcess(**dict(zip(names, values))))
    return candidates


def grid_search(probs, true_masks, grid: Grid, class_probs=None) -> list[tuple[PostProcess, float]]:
    """Scores every PostProcess of `grid` by mean challenge Dice; returns (setting, dice), best first.

    probs: probability maps (N, H, W) (or a sequence of (H, W) maps), true_masks: their truth.
    Each image's thresholded masks and component filterings are computed once per distinct value,
    so a candidate costs O(N).
    """
    candidates = expand_grid(grid)
    if class_probs is None and any(c.class_threshold is not None for c in candidates):
        raise ValueError("the grid gates by class_threshold but no class_probs were given")
    binarise = sorted({c.binarise_threshold for c in candidates})
    component_areas = sorted({c.min_component_area for c in candidates})
    tops = sorted({c.top_threshold for c in candidates if c.mode == "triplet"})

    kept_dice, top_counts, truth_empty = [], [], []
    for prob, truth in zip(probs, true_masks, strict=True):
        prob, truth = np.asarray(prob), np.asarray(truth, bool)
        kept_dice.append(_dice_table(prob, truth, binarise, component_areas))
        top_counts.append([np.count_nonzero(prob > t) for t in tops])
        truth_empty.append(not truth.any())
    kept_dice = np.stack(kept_dice)  # (N, len(binarise), len(component_areas))
    top_counts = np.asarray(top_counts).reshape(len(truth_empty), len(tops))
    empty_dice = np.asarray(truth_empty, np.float64)  # Dice of an image predicted empty
    class_probs = None if class_probs is None else np.asarray(class_probs, np.float64).reshape(-1)

    results = []
    for c in candidates:
        dice = kept_dice[:, binarise.index(c.binarise_threshold), component_areas.index(c.min_component_area)]
        keep = np.ones(len(dice), bool)
        if c.class_threshold is not None:
            keep &= class_probs >= c.class_threshold
        if c.mode == "triplet":
            keep &= top_counts[:, tops.index(c.top_threshold)] >= c.min_area
        results.append((c, float(np.mean(np.where(keep, dice, empty_dice)))))
    return sorted(results, key=lambda result: -result[1])


def _dice_table(prob, truth, binarise, component_areas) -> np.ndarray:
    """Dice of one image for each (binarisation threshold, minimum component area) pair."""
    table = np.empty((len(binarise), len(component_areas)))
    true_area = np.count_nonzero(truth)
    for i, threshold in enumerate(binarise):
        labels, areas = _components(prob > threshold)
        overlaps = np.bincount(labels.ravel(), weights=truth.ravel(), minlength=len(areas))
        for j, min_area in enumerate(component_areas):
            kept = areas >= max(min_area, 1)  # never the background, whose area is 0
            table[i, j] = dice_from_areas(overlaps[kept].sum(), areas[kept].sum(), true_area)
    return table
