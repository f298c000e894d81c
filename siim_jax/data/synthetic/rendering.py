"""One radiograph and its mask: anatomy, bones, markings and the pneumothorax turned into grey levels."""

from __future__ import annotations

import cv2
import numpy as np

from siim_jax.data.synthetic.anatomy import (
    CANVAS_SIZE,
    IMAGE_SIZE,
    Anatomy,
    Fields,
    evaluate_fields,
    lung_mask,
    ramp,
    resize,
    sample_anatomy,
    tissue_density,
)
from siim_jax.data.synthetic.drawing import bone_layer, gaussian_noise, lung_markings
from siim_jax.data.synthetic.patients import Patient, sample_patient
from siim_jax.data.synthetic.pneumothorax import (
    collapse_depth,
    collapse_source,
    pleural_line,
    pneumothorax_mask,
    sample_pneumothoraces,
)

DEFAULT_DIFFICULTY = 0.5
MAX_DARKENING = 0.14  # attenuation removed inside the region at difficulty 0 (aerated lung is about 0.3)
MAX_PLEURAL_LINE = 0.16  # attenuation added on the pleural line at difficulty 0


def expose(attenuation: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    low, high = anatomy.window
    return 255.0 * cv2.pow(np.clip((attenuation - low) / (high - low), 0.0, 1.0), anatomy.gamma)


def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def render_case(
    rng: np.random.Generator | int,
    positive: bool,
    difficulty: float = DEFAULT_DIFFICULTY,
    patient: Patient | None = None,
    source_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One radiograph: (uint8 1024x1024 image, bool 1024x1024 pneumothorax mask). A positive case gets a
    procedural region unless ``source_mask`` (for instance a real mask) is given. The first draws from ``rng``
    are the patient (unless given), then the anatomy: ``sample_anatomy`` can replay them."""
    check_unit_interval("difficulty", difficulty)
    rng = np.random.default_rng(rng)
    anatomy = sample_anatomy(rng, patient or sample_patient(rng))
    fields = evaluate_fields(anatomy)
    shapes = sample_pneumothoraces(rng) if positive and source_mask is None else []
    depths = [collapse_depth(anatomy, fields, shape) for shape in shapes]
    if shapes:
        mask = pneumothorax_mask(fields, shapes, depths)
    elif positive:
        mask = np.asarray(source_mask, bool).reshape(IMAGE_SIZE, IMAGE_SIZE)
    else:
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)

    visibility = 1.0 - difficulty
    grey = resize(expose(attenuation(rng, anatomy, fields, mask, depths, visibility), anatomy), IMAGE_SIZE)
    if mask.any():
        box, line = pleural_line(mask, lung_mask(fields))
        grey[box] += line * (MAX_PLEURAL_LINE * visibility * 255.0 / (anatomy.window[1] - anatomy.window[0]))
    grey += gaussian_noise(rng, IMAGE_SIZE, anatomy.noise)
    return cv2.convertScaleAbs(np.clip(grey, 0.0, 255.0, out=grey)), mask


def to_canvas(*layers: np.ndarray) -> list[np.ndarray]:
    """Field-grid layers resized to the canvas in one call."""
    return list(np.moveaxis(resize(np.dstack(layers), CANVAS_SIZE), -1, 0))


def attenuation(rng, anatomy: Anatomy, fields: Fields, mask: np.ndarray, depths: list, visibility: float) -> np.ndarray:
    """The canvas's attenuation: tissue minus the lungs' air, plus markings and bones; the pneumothorax is air
    without markings, darkened by ``MAX_DARKENING * visibility``, and a collapsed lung's markings crowd inward."""
    lung = np.maximum(*fields.lungs)
    marking_gain = ramp(lung, 0.01) * np.clip(1.4 - np.minimum(*fields.rhos), 0.4, 1.0)  # fading outward
    air = ramp(lung, 0.02) * (1.0 - 0.15 * np.clip((fields.y - 0.45) / 0.3, 0.0, 1.0))
    tissue, air, marking_gain = to_canvas(tissue_density(anatomy, fields), air, marking_gain)

    region = resize(mask.astype(np.float32), CANVAS_SIZE, cv2.INTER_AREA)
    markings = lung_markings(rng, anatomy) * marking_gain
    if depths:
        depth = np.maximum.reduce(depths)
        depth, source_x, source_y = to_canvas(depth, *collapse_source(anatomy, depth))
        markings = cv2.remap(markings, source_x * CANVAS_SIZE - 0.5, source_y * CANVAS_SIZE - 0.5, cv2.INTER_LINEAR)
        air *= 1.0 - 0.5 * depth * (1.0 - region)  # a collapsed lung holds less air
    air = np.maximum(air, region)  # a pneumothorax is air, also where a real mask overhangs this lung's outline
    total = tissue - anatomy.air_depth * air + 0.12 * markings * (1.0 - region)
    total += 0.07 * bone_layer(anatomy) * (0.35 + 0.65 * air)
    return total - MAX_DARKENING * visibility * region
