"""The pneumothorax: crescent-shaped regions at the chest wall, their masks, the collapse and the pleural line."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from siim_jax.data.synthetic.anatomy import FIELD_SIZE, IMAGE_SIZE, Anatomy, Fields, elevation, resize, unit_grid

MIN_COMPONENT_PIXELS = 64  # smaller specks of a procedural mask are dropped rather than written as label rows


@dataclasses.dataclass(frozen=True)
class PneumothoraxShape:
    """A crescent between the chest wall and the collapsed lung, described from the hilum of one lung."""

    side: int  # index into Anatomy.lungs
    centre: float  # elevation of its deepest point (0 lateral, pi/2 apical)
    half_width: float  # radians of elevation on either side where it tapers to nothing
    depth: float  # at its deepest, the fraction of the hilum-to-wall distance the lung has fallen back
    wobble: tuple[float, float, float]  # amplitude, frequency, phase of the pleural line's undulation

    def depth_at(self, theta: np.ndarray) -> np.ndarray:
        offset = ((theta - self.centre + np.pi) % (2 * np.pi) - np.pi) / self.half_width
        profile = np.clip(1.0 - offset * offset, 0.0, 1.0) ** 0.6
        amplitude, frequency, phase = self.wobble
        return self.depth * profile * (1.0 + amplitude * np.sin(frequency * theta + phase))


def sample_pneumothorax(rng: np.random.Generator, side: int, size_scale: float = 1.0) -> PneumothoraxShape:
    size = rng.random() ** 1.7 * size_scale  # 0: apical/lateral sliver .. 1: large collapse
    return PneumothoraxShape(
        side=side,
        centre=rng.uniform(0.2, 1.5) if size < 0.5 else rng.uniform(0.4, 1.0),
        half_width=0.45 + 0.8 * size + rng.uniform(0.0, 0.2),
        depth=0.11 + 0.45 * size,
        wobble=(rng.uniform(0.03, 0.1), rng.uniform(3.0, 7.0), rng.uniform(0.0, 2 * np.pi)),
    )


def sample_pneumothoraces(rng: np.random.Generator) -> list[PneumothoraxShape]:
    """Mostly one side; sometimes both, the second one smaller (its own rows in the label file)."""
    first = sample_pneumothorax(rng, int(rng.integers(2)))
    if rng.random() < 0.08:
        return [first, sample_pneumothorax(rng, 1 - first.side, size_scale=0.5)]
    return [first]


def collapse_depth(anatomy: Anatomy, fields: Fields, shape: PneumothoraxShape) -> np.ndarray:
    """How far (as a fraction of the hilum-to-wall distance) the lung has fallen back, over its own side."""
    lung = anatomy.lungs[shape.side]
    own_side = lung.lateral_sign * (fields.x - anatomy.mediastinum_x) > 0
    return shape.depth_at(elevation(fields.x, fields.y, lung)) * own_side


def pneumothorax_mask(fields: Fields, shapes: list[PneumothoraxShape], depths: list[np.ndarray]) -> np.ndarray:
    """The full-size mask: lung beyond the collapsed lung's edge, at rho > 1 - depth."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for shape, depth in zip(shapes, depths):
        region = np.minimum(fields.lungs[shape.side], 0.25 * (fields.rhos[shape.side] - 1.0 + depth))
        mask |= resize(region, IMAGE_SIZE) > 0
    parts = mask_components(mask)
    return np.any(parts, axis=0) if parts else np.zeros_like(mask)


def collapse_source(anatomy: Anatomy, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates the collapsed lung's markings come from: a point at radius r from its hilum shows what
    lay at r / (1 - depth)."""
    x, y = unit_grid(FIELD_SIZE)
    (left_x, left_y), (right_x, right_y) = (anatomy.pose.to_image(lung.hilum) for lung in anatomy.lungs)
    left = x < (left_x + right_x) / 2
    hilum_x, hilum_y = np.where(left, left_x, right_x), np.where(left, left_y, right_y)
    gain = 1.0 / (1.0 - depth)
    return hilum_x + (x - hilum_x) * gain, hilum_y + (y - hilum_y) * gain


def mask_components(mask: np.ndarray) -> list[np.ndarray]:
    """The connected regions of a mask (8-connected) of at least MIN_COMPONENT_PIXELS, each full size."""
    if not mask.any():
        return []
    left, top, width, height = cv2.boundingRect(mask.view(np.uint8))
    box = (slice(top, top + height), slice(left, left + width))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask[box].view(np.uint8), connectivity=8)
    parts = []
    for label in range(1, count):
        if stats[label, cv2.CC_STAT_AREA] >= MIN_COMPONENT_PIXELS:
            part = np.zeros_like(mask)
            part[box] = labels == label
            parts.append(part)
    return parts


def pleural_line(mask: np.ndarray, lung: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray]:
    """The visceral pleura: a thin soft line just outside the mask where it borders lung, computed in the mask's
    bounding box; returns (box, line peaking near 1)."""
    left, top, width, height = cv2.boundingRect(mask.view(np.uint8))
    pad = 8
    box = (slice(max(top - pad, 0), top + height + pad), slice(max(left - pad, 0), left + width + pad))
    inside = mask[box].view(np.uint8)
    ring = (cv2.dilate(inside, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))) > inside) & lung[box]
    return box, cv2.GaussianBlur(ring.astype(np.float32), (0, 0), 0.9) * 1.6
