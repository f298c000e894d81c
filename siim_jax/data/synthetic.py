"""A synthetic SIIM-ACR dataset written in the challenge's own format.

``generate`` writes::

    OUT/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    OUT/dicom-images-test/...            (same layout)
    OUT/train-rle.csv                    stage-1 labels: header ``ImageId, EncodedPixels``, lines ``id, rle``
    OUT/sample_submission.csv            the test ids, all ``-1``: header ``ImageId,EncodedPixels``
    OUT/stage_2_train.csv                (``stage2=True``) train and test labels, no spaces, like stage 2

The DICOM files copy the structure of the real ones: CR, Secondary Capture, 1024x1024 8-bit MONOCHROME2, one JPEG
Baseline fragment. Each image is a procedural chest radiograph (body, lungs with branching vessel markings, ribs,
clavicles, spine, mediastinum and heart, diaphragm) with its own exposure, pose and anatomy. A pneumothorax is a
region at the apical/lateral chest wall with no lung markings, darker than the lung, bounded by a thin bright
pleural line, while the collapsed lung's markings crowd toward the hilum. Its masks are procedural, or the
positive rows of a real label file (``mask_source``), rendered with the same appearance.

``difficulty`` in [0, 1] (default 0.5) sets how the region stands out; it never has lung markings. At the default
the region loses 0.07 of attenuation (``MAX_DARKENING / 2``), about 18 grey levels at a typical exposure, and its
pleural line is about 18 grey levels brighter than the lung beside it; with the missing markings and the denser
collapsed lung, the region averages about 30 grey levels darker than the lung next to it. Difficulty 0 doubles the
darkening and the line; 1 removes both, leaving the missing markings and the collapse. Procedural regions cover
4% (apical or lateral slivers) to 50% (large collapses) of their lung field, median 14%; about 8% of positive
images have one on each side (two label rows). Masks from a real label file keep their place, so some overhang
this anatomy's lung outline; they are rendered as air all the same.

Every random choice for image ``index`` of a split comes from ``SeedSequence(seed, spawn_key=(split, index))``:
images can be made in any order or in parallel, and one seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import math
import multiprocessing
import time
import uuid
from pathlib import Path
from statistics import NormalDist
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid
from tqdm import tqdm

from siim_jax.data import rle

IMAGE_SIZE = 1024
FIELD_SIZE = 256  # smooth anatomy (outlines, densities, the pneumothorax's shape) is evaluated on this grid
CANVAS_SIZE = 512  # ribs and lung markings are drawn here; the pleural line and noise are added at full size
DEFAULT_DIFFICULTY = 0.5
DEFAULT_POSITIVE_FRACTION = 0.22
MAX_DARKENING = 0.14  # attenuation removed inside the region at difficulty 0 (aerated lung is about 0.3)
MAX_PLEURAL_LINE = 0.16  # attenuation added on the pleural line at difficulty 0
LUNG_TAPER = 0.2  # how much narrower than an ellipse the lungs are at the apex (and broader at the base)
JPEG_QUALITY = 92
MIN_COMPONENT_PIXELS = 64  # smaller specks of a procedural mask are dropped rather than written as label rows
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters

SPLIT_KEYS = {"train": 1, "test": 2}
SPLIT_DIRS = {"train": "dicom-images-train", "test": "dicom-images-test"}
TRAIN_CSV = "train-rle.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
STAGE2_CSV = "stage_2_train.csv"
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["siim-jax synthetic"])
PIXEL_SPACINGS = ("0.139", "0.143", "0.168", "0.171")
NORMAL_QUANTILES = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], np.float32)


# ---------------------------------------------------------------------------------------------------- identities


@dataclasses.dataclass(frozen=True)
class CaseIdentity:
    image_id: str  # = SOPInstanceUID
    study_uid: str
    series_uid: str


@dataclasses.dataclass(frozen=True)
class Patient:
    patient_id: str
    sex: str
    age: str
    view: str
    pixel_spacing: str


def case_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLIT_KEYS[split], index)))


def case_identity(seed: int, split: str, index: int) -> CaseIdentity:
    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["siim-jax synthetic", str(seed), split, str(index), kind])

    return CaseIdentity(image_id=uid("sop"), study_uid=uid("study"), series_uid=uid("series"))


def is_positive(seed: int, split: str, index: int, fraction: float = DEFAULT_POSITIVE_FRACTION) -> bool:
    """Stratified labels: the first n cases hold floor(n*f + u) - floor(u) positives (u from the seed), the
    requested fraction up to one case at every n, while each case's label is still computed on its own."""
    offset = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLIT_KEYS[split],))).random()
    return math.floor((index + 1) * fraction + offset) > math.floor(index * fraction + offset)


def sample_patient(rng: np.random.Generator) -> Patient:
    patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    return Patient(
        patient_id=patient_id,
        sex=str(rng.choice(["M", "F"])),
        age=str(rng.integers(18, 90)),
        view=str(rng.choice(["PA", "AP"], p=[0.6, 0.4])),
        pixel_spacing=str(rng.choice(PIXEL_SPACINGS)),
    )


# ---------------------------------------------------------------------------------------------------- anatomy


@dataclasses.dataclass(frozen=True)
class Pose:
    """Similarity from canonical body coordinates to image coordinates (both the unit square, y down)."""

    angle: float  # radians
    scale: float
    shift: tuple[float, float]

    def to_image(self, points: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        centred = (np.asarray(points, np.float32) - 0.5) @ np.array([[c, s], [-s, c]], np.float32)
        return centred * self.scale + 0.5 + np.asarray(self.shift, np.float32)

    def to_canonical(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = (x - 0.5 - self.shift[0]) / self.scale
        v = (y - 0.5 - self.shift[1]) / self.scale
        c, s = math.cos(self.angle), math.sin(self.angle)
        return c * u + s * v + 0.5, -s * u + c * v + 0.5


@dataclasses.dataclass(frozen=True)
class Lung:
    lateral_sign: int  # -1: image left (the patient's right lung), +1: image right
    centre: tuple[float, float]  # of the outer ellipse that stands for the chest wall
    axes: tuple[float, float]
    hilum: tuple[float, float]
    dome_top: float  # y of the hemidiaphragm's dome
    dome_base: float  # y where the diaphragm meets the chest wall


@dataclasses.dataclass(frozen=True)
class Anatomy:
    pose: Pose
    lungs: tuple[Lung, Lung]
    body_half_width: float
    neck_half_width: float
    shoulder_y: float
    mediastinum_x: float
    mediastinum_half_width: float
    heart_centre: tuple[float, float]
    heart_axes: tuple[float, float]
    arms: bool
    breasts: bool
    gastric_bubble: bool
    rib_spacing: float
    rib_tilt: float  # radians; posterior ribs fall toward the chest wall
    air_depth: float  # attenuation the lungs' air removes
    gradient: tuple[float, float]  # slow exposure drift across x and y
    window: tuple[float, float]  # attenuation mapped to black and white
    gamma: float
    noise: float  # grey levels of quantum noise at full size


def sample_lung(rng: np.random.Generator, lateral_sign: int) -> Lung:
    dome_top = rng.uniform(0.66, 0.72) + (0.025 if lateral_sign > 0 else 0.0)  # the right dome sits higher
    return Lung(
        lateral_sign=lateral_sign,
        centre=(0.5 + lateral_sign * rng.uniform(0.19, 0.215), rng.uniform(0.44, 0.48)),
        axes=(rng.uniform(0.165, 0.19), rng.uniform(0.37, 0.41)),
        hilum=(0.5 + lateral_sign * rng.uniform(0.085, 0.105), rng.uniform(0.40, 0.45)),
        dome_top=dome_top,
        dome_base=dome_top + rng.uniform(0.06, 0.11),
    )


def sample_anatomy(rng: np.random.Generator, patient: Patient) -> Anatomy:
    supine = patient.view == "AP"  # AP films magnify the heart
    shift = rng.uniform(-0.03, 0.03, 2).tolist()
    return Anatomy(
        pose=Pose(angle=rng.uniform(-0.07, 0.07), scale=rng.uniform(0.92, 1.06), shift=(shift[0], shift[1])),
        lungs=(sample_lung(rng, -1), sample_lung(rng, +1)),
        body_half_width=rng.uniform(0.42, 0.48),
        neck_half_width=rng.uniform(0.07, 0.09),
        shoulder_y=rng.uniform(0.1, 0.18),
        mediastinum_x=0.5 + rng.uniform(-0.01, 0.015),
        mediastinum_half_width=rng.uniform(0.04, 0.055),
        heart_centre=(0.5 + rng.uniform(0.03, 0.06), rng.uniform(0.64, 0.68)),  # resting on the diaphragm
        heart_axes=(rng.uniform(0.13, 0.15) + 0.02 * supine, rng.uniform(0.11, 0.13)),
        arms=bool(rng.random() < 0.6),
        breasts=patient.sex == "F",
        gastric_bubble=bool(rng.random() < 0.6),
        rib_spacing=rng.uniform(0.052, 0.06),
        rib_tilt=rng.uniform(0.1, 0.25),
        air_depth=rng.uniform(0.36, 0.44),
        gradient=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)),
        window=(rng.uniform(-0.04, 0.08), rng.uniform(0.95, 1.08)),
        gamma=rng.uniform(0.8, 1.25),
        noise=rng.uniform(1.5, 3.0),
    )


@functools.lru_cache(maxsize=3)
def unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres of a size x size image in unit coordinates."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    return tuple(np.meshgrid(centres, centres))


def ramp(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """A soft 0..1 edge: 1 inside (positive distance), 0 outside, linear over ``width``."""
    return np.clip(0.5 + signed_distance / width, 0.0, 1.0)


def ellipse_outside(x, y, centre, axes) -> np.ndarray:
    """Roughly the distance outside an ellipse (negative inside), in the units of its axes."""
    radius = np.sqrt(((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2)
    return (radius - 1.0) * min(axes)


def radial_coordinate(x, y, lung: Lung) -> np.ndarray:
    """0 at the hilum, 1 on the chest wall: |p - h| over the length of the ray from the hilum h through p to the
    lung's outer ellipse (the larger root of a quadratic, rationalised so the hilum itself is not 0/0), with x
    scaled about the hilum so the ellipse tapers toward the apex."""
    (hx, hy), (cx, cy), (a, b) = lung.hilum, lung.centre, lung.axes
    taper = 1.0 + LUNG_TAPER * (y - cy) / b  # narrower apex, broader base than the ellipse
    ux, uy = (x - hx) / (a * taper), (y - hy) / b
    ox, oy = (hx - cx) / a, (hy - cy) / b
    quad_a = ux * ux + uy * uy
    quad_b = 2.0 * (ox * ux + oy * uy)
    quad_c = ox * ox + oy * oy - 1.0  # < 0: the hilum lies inside the ellipse
    return (quad_b + np.sqrt(quad_b * quad_b - 4.0 * quad_a * quad_c)) / (-2.0 * quad_c)


def elevation(x, y, lung: Lung) -> np.ndarray:
    """Angle seen from the hilum: 0 toward the chest wall, pi/2 toward the apex, -pi/2 toward the diaphragm."""
    return np.arctan2(-(y - lung.hilum[1]), lung.lateral_sign * (x - lung.hilum[0]))


def dome_height(x, lung: Lung) -> np.ndarray:
    u = (x - lung.centre[0]) / (lung.axes[0] * 1.15)
    return lung.dome_base - (lung.dome_base - lung.dome_top) * np.clip(1.0 - u * u, 0.0, 1.0)


def mediastinum_outside(x, y, anatomy: Anatomy) -> np.ndarray:
    """Distance outside mediastinum, heart and aortic knob (negative inside)."""
    band = np.abs(x - anatomy.mediastinum_x) - (anatomy.mediastinum_half_width + 0.02 * y)
    heart = ellipse_outside(x, y, anatomy.heart_centre, anatomy.heart_axes)
    knob_centre = (anatomy.mediastinum_x + anatomy.mediastinum_half_width + 0.012, 0.3)
    knob = ellipse_outside(x, y, knob_centre, (0.03, 0.035))
    return np.minimum(np.minimum(band, heart), knob)


@dataclasses.dataclass(frozen=True)
class Fields:
    """The anatomy's smooth geometry on the field grid, at canonical coordinates (x, y)."""

    x: np.ndarray
    y: np.ndarray
    mediastinum: np.ndarray  # distance outside mediastinum and heart
    rhos: tuple[np.ndarray, np.ndarray]  # radial coordinate of each lung (see radial_coordinate)
    lungs: tuple[np.ndarray, np.ndarray]  # signed distance inside each lung field


def evaluate_fields(anatomy: Anatomy) -> Fields:
    x, y = anatomy.pose.to_canonical(*unit_grid(FIELD_SIZE))
    mediastinum = mediastinum_outside(x, y, anatomy)
    rhos = tuple(radial_coordinate(x, y, lung) for lung in anatomy.lungs)
    lungs = tuple(
        np.minimum(np.minimum(0.25 * (1.0 - rho), mediastinum), dome_height(x, lung) - y)
        for lung, rho in zip(anatomy.lungs, rhos)
    )
    return Fields(x, y, mediastinum, rhos, lungs)


def lung_mask(fields: Fields) -> np.ndarray:
    """Both lung fields as a full-size bool mask."""
    return resize(np.maximum(*fields.lungs), IMAGE_SIZE) > 0


def torso(anatomy: Anatomy, x, y) -> np.ndarray:
    """Soft tissue of neck, shoulders, trunk and arms, thickest in the middle."""
    rise = np.clip((y + 0.08) / (anatomy.shoulder_y + 0.08), 0.0, 1.0)
    waist = 1.0 - 0.08 * np.clip((y - 0.6) / 0.4, 0.0, 1.0)
    shoulders = rise * rise * (3 - 2 * rise)  # smoothstep from the neck out to the shoulders
    half_width = (anatomy.neck_half_width + (anatomy.body_half_width - anatomy.neck_half_width) * shoulders) * waist
    across = (x - 0.5) / half_width
    body = ramp(half_width - np.abs(x - 0.5), 0.03) * (0.46 + 0.26 * np.sqrt(np.clip(1.0 - across * across, 0.0, 1.0)))
    if anatomy.arms:
        for side in (-1, 1):
            arm = ellipse_outside(x, y, (0.5 + side * (anatomy.body_half_width + 0.08), 0.3), (0.08, 0.45))
            body = np.maximum(body, 0.42 * ramp(-arm, 0.04))
    return body


def tissue_density(anatomy: Anatomy, fields: Fields) -> np.ndarray:
    """Attenuation of everything but the lungs' air: body, mediastinum, spine, abdomen, hila, breasts."""
    x, y, mid = fields.x, fields.y, anatomy.mediastinum_x
    diaphragm = np.where(x < mid, dome_height(x, anatomy.lungs[0]), dome_height(x, anatomy.lungs[1]))
    density = torso(anatomy, x, y) + 0.1 * ramp(y - diaphragm, 0.015) + 0.07 * ramp(-fields.mediastinum, 0.06)
    density += ramp(0.03 - np.abs(x - mid), 0.015) * (0.03 + 0.012 * np.cos(2 * np.pi * y / 0.045))  # spine
    density -= 0.05 * ramp(0.011 - np.abs(x - mid), 0.008) * ramp(0.32 - y, 0.04)  # trachea
    for lung in anatomy.lungs:
        density += 0.06 * np.exp(-((x - lung.hilum[0]) ** 2 + (y - lung.hilum[1]) ** 2) / 0.0015)
    if anatomy.gastric_bubble:
        bubble = (mid + 0.17, anatomy.lungs[1].dome_top + 0.055)
        density -= 0.12 * ramp(-ellipse_outside(x, y, bubble, (0.05, 0.028)), 0.012)
    if anatomy.breasts:
        for side in (-1, 1):
            density += 0.07 * ramp(-ellipse_outside(x, y, (mid + side * 0.25, 0.74), (0.17, 0.11)), 0.05)
    return density + anatomy.gradient[0] * (x - 0.5) + anatomy.gradient[1] * (y - 0.5)


# ---------------------------------------------------------------------------------------------------- drawing


def bezier(p0, p1, p2, count: int = 16) -> np.ndarray:
    t = np.linspace(0.0, 1.0, count, dtype=np.float32)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t * t * np.asarray(p2)


def draw_curves(canvas: np.ndarray, curves: np.ndarray, thickness: float, pose: Pose, value: int = 255) -> None:
    """Draws canonical polylines (k, m, 2) onto a uint8 canvas at sub-pixel precision (aliased: the layers
    are blurred afterwards)."""
    points = np.round(pose.to_image(curves) * (CANVAS_SIZE * 16)).astype(np.int32)
    width = max(1, round(thickness * CANVAS_SIZE * pose.scale))
    cv2.polylines(canvas, list(points), False, value, thickness=width, lineType=cv2.LINE_8, shift=4)


def blurred(layer_u8: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(layer_u8.astype(np.float32) * (1 / 255), (0, 0), sigma)


def posterior_ribs(anatomy: Anatomy, lateral_sign: int) -> np.ndarray:
    """Arcs from the spine over the top of each rib out to the chest wall and down along it."""
    index = np.arange(9, dtype=np.float32)[:, None]
    top = 0.1 + anatomy.rib_spacing * index * (1 + 0.03 * index)
    half_width, half_height = 0.27 + 0.01 * index, 0.05 + 0.005 * index
    tau = np.linspace(0.0, np.pi / 2 + 0.45, 20, dtype=np.float32)[None, :]
    local = np.stack([lateral_sign * half_width * np.sin(tau), -half_height * np.cos(tau)], axis=-1)
    tilt = lateral_sign * anatomy.rib_tilt
    rotation = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]], np.float32)
    centre = np.stack([np.full_like(top, anatomy.mediastinum_x + lateral_sign * 0.02), top + half_height], axis=-1)
    return local @ rotation.T + centre


def anterior_ribs(anatomy: Anatomy, lateral_sign: int) -> np.ndarray:
    """Faint arcs from the chest wall down toward the sternum."""
    mid, side = anatomy.mediastinum_x, lateral_sign
    starts = 0.17 + anatomy.rib_spacing * 1.25 * np.arange(5)
    return np.stack([
        bezier((mid + side * 0.34, y), (mid + side * 0.19, y + 0.015), (mid + side * 0.08, y + 0.11)) for y in starts
    ])


def clavicle(anatomy: Anatomy, lateral_sign: int) -> np.ndarray:
    mid, side = anatomy.mediastinum_x, lateral_sign
    return bezier((mid + side * 0.04, 0.16), (mid + side * 0.2, 0.1), (mid + side * 0.36, 0.09))[None]


def bone_layer(anatomy: Anatomy) -> np.ndarray:
    """Ribs and clavicles as a 0..1 density layer; posterior ribs have brighter cortical margins."""
    posterior = np.zeros((CANVAS_SIZE, CANVAS_SIZE), np.uint8)
    other = np.zeros_like(posterior)
    for side in (-1, 1):
        ribs = posterior_ribs(anatomy, side)
        draw_curves(posterior, ribs, 0.02, anatomy.pose, 255)
        draw_curves(posterior, ribs, 0.012, anatomy.pose, 170)
        draw_curves(other, anterior_ribs(anatomy, side), 0.016, anatomy.pose, 100)
        draw_curves(other, clavicle(anatomy, side), 0.024, anatomy.pose, 255)
    return blurred(np.maximum(posterior, other), 1.5)


def walk(start: np.ndarray, heading: np.ndarray, step: np.ndarray, lung: Lung) -> np.ndarray:
    """Polylines from ``start`` (k, 1, 2) taking steps of length ``step`` along ``heading`` (k, m), elevation angles."""
    direction = np.stack([lung.lateral_sign * np.cos(heading), -np.sin(heading)], axis=-1) * step
    return np.concatenate([start, start + np.cumsum(direction, axis=1)], axis=1).astype(np.float32)


def vessel_tree(rng: np.random.Generator, lung: Lung) -> list[tuple[np.ndarray, float]]:
    """Branching lung markings fanning out from the hilum, as (curves, thickness) tiers, thickest first."""
    trunks, steps = 18, 9
    heading = np.deg2rad(rng.uniform(-75, 100, (trunks, 1))) + np.cumsum(rng.normal(0, 0.09, (trunks, steps)), 1)
    start = np.asarray(lung.hilum, np.float32) + rng.normal(0, 0.01, (trunks, 1, 2))
    trunk = walk(start, heading, rng.uniform(0.02, 0.028, (trunks, 1, 1)), lung)

    forks = trunks * 3
    parent, at = np.repeat(np.arange(trunks), 3), rng.integers(2, steps - 1, forks)
    turn = rng.choice([-1.0, 1.0], forks) * rng.uniform(0.3, 0.8, forks)
    twig_heading = (heading[parent, at] + turn)[:, None] + np.cumsum(rng.normal(0, 0.12, (forks, 5)), 1)
    twig = walk(trunk[parent, at][:, None], twig_heading, rng.uniform(0.012, 0.02, (forks, 1, 1)), lung)
    return [(trunk[:, :4], 0.009), (trunk[:, 3:7], 0.006), (trunk[:, 6:], 0.004), (twig, 0.003)]


def lung_markings(rng: np.random.Generator, anatomy: Anatomy) -> np.ndarray:
    """Vessel markings plus fine parenchymal mottle on the canvas, roughly 0..1."""
    layer = np.zeros((CANVAS_SIZE, CANVAS_SIZE), np.uint8)
    for lung in anatomy.lungs:
        for curves, thickness in vessel_tree(rng, lung):
            draw_curves(layer, curves, thickness, anatomy.pose, 255)
    mottle = cv2.GaussianBlur(gaussian_noise(rng, CANVAS_SIZE, 1.0), (0, 0), 1.3)
    return blurred(layer, 2.0) + 0.4 * mottle


# ---------------------------------------------------------------------------------------------------- pneumothorax


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


# ---------------------------------------------------------------------------------------------------- rendering


def resize(layer: np.ndarray, size: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    return cv2.resize(layer, (size, size), interpolation=interpolation)


def gaussian_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian noise (size x size), drawn as random bytes mapped through 256 normal quantiles: several times
    faster than ``standard_normal`` and fine for texture."""
    noise_bytes = np.frombuffer(rng.bytes(size * size), np.uint8).reshape(size, size)
    return cv2.LUT(noise_bytes, NORMAL_QUANTILES * sigma)


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


# ---------------------------------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class SyntheticCase:
    identity: CaseIdentity
    patient: Patient
    image: np.ndarray
    mask: np.ndarray
    rles: tuple[str, ...]  # the label rows of this image; ("-1",) when negative


@functools.lru_cache(maxsize=2)
def load_mask_pool(path: str) -> tuple[tuple[str, ...], ...]:
    """The positive rows of a label file (any of the challenge's variants), grouped per image in file order."""
    frame = pd.read_csv(path, skipinitialspace=True, dtype=str, encoding="utf-8-sig")
    ids, rles = frame.iloc[:, 0].str.strip(), frame.iloc[:, 1].str.strip()
    positive = rles != rle.EMPTY
    groups = rles[positive].groupby(ids[positive], sort=False)
    pool = tuple(tuple(group) for _, group in groups)
    if not pool:
        raise ValueError(f"{path} has no positive rows to draw masks from")
    return pool


def synthesize_case(
    seed: int,
    split: str,
    index: int,
    positive_fraction: float = DEFAULT_POSITIVE_FRACTION,
    difficulty: float = DEFAULT_DIFFICULTY,
    mask_source: str | Path | None = None,
) -> SyntheticCase:
    """Case ``index`` of ``split``, a function of its arguments alone."""
    rng = case_rng(seed, split, index)
    positive = is_positive(seed, split, index, positive_fraction)
    patient = sample_patient(rng)
    source_rles = None
    if positive and mask_source is not None:
        pool = load_mask_pool(str(mask_source))
        source_rles = pool[rng.integers(len(pool))]
    source_mask = rle.decode_merged(source_rles) if source_rles else None
    image, mask = render_case(rng, positive, difficulty, patient, source_mask)
    if source_rles:
        rles = source_rles
    else:
        rles = tuple(rle.encode(component) for component in mask_components(mask)) or (rle.EMPTY,)
    return SyntheticCase(case_identity(seed, split, index), patient, image, mask, rles)


# ---------------------------------------------------------------------------------------------------- writing


def encode_jpeg(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode the JPEG")
    return data.tobytes()


def write_dicom(path: str | Path, pixels: np.ndarray, identity: CaseIdentity, patient: Patient) -> None:
    """Writes an 8-bit MONOCHROME2 image as one JPEG Baseline fragment with the real files' metadata."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = identity.image_id
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SIIM_JAX_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = identity.image_id
    ds.StudyDate, ds.StudyTime = "19010101", "000000.00"
    ds.AccessionNumber = ""
    ds.Modality, ds.ConversionType = "CR", "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {patient.view}"
    ds.PatientName = ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient.sex
    with config.disable_value_validation():  # the challenge's files say '62', where the standard says '062Y'
        ds.PatientAge = patient.age
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", patient.view
    ds.StudyInstanceUID, ds.SeriesInstanceUID = identity.study_uid, identity.series_uid
    ds.StudyID = ""
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [patient.pixel_spacing, patient.pixel_spacing]
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.add_new(0x7FE00010, "OB", encapsulate([encode_jpeg(pixels)], has_bot=False))
    ds.save_as(path, enforce_file_format=True)


def dicom_path(out_dir: Path, split: str, identity: CaseIdentity) -> Path:
    return out_dir / SPLIT_DIRS[split] / identity.study_uid / identity.series_uid / f"{identity.image_id}.dcm"


@dataclasses.dataclass(frozen=True)
class _Task:
    out_dir: Path
    seed: int
    split: str
    index: int
    positive_fraction: float
    difficulty: float
    mask_source: str | None


class _Written(NamedTuple):
    split: str
    image_id: str
    rles: tuple[str, ...]

    @property
    def positive(self) -> bool:
        return self.rles != (rle.EMPTY,)


def _write_case(task: _Task) -> _Written:
    """Renders and writes one case."""
    case = synthesize_case(task.seed, task.split, task.index, task.positive_fraction, task.difficulty, task.mask_source)
    path = dicom_path(task.out_dir, task.split, case.identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(path, case.image, case.identity, case.patient)
    return _Written(task.split, case.identity.image_id, case.rles)


def _keep_freed_memory() -> None:
    """Rendering allocates and frees many arrays of megabytes; by default glibc hands them back to the kernel
    and page-faults them in again, a quarter of the run time. Raising its mmap and trim thresholds keeps them
    in the heap (glibc only; elsewhere a no-op). It lasts for the process."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
    mallopt(M_TRIM_THRESHOLD, 256 << 20)


def _prepare_worker() -> None:
    cv2.setNumThreads(1)  # the pool's processes already fill the cores
    _keep_freed_memory()


def write_labels(path: Path, rows: list[tuple[str, str]], separator: str) -> None:
    header = f"ImageId{separator}EncodedPixels\n"
    path.write_text(header + "".join(f"{image_id}{separator}{encoded}\n" for image_id, encoded in rows))


def label_rows(written: list[_Written]) -> list[tuple[str, str]]:
    return [(case.image_id, encoded) for case in written for encoded in case.rles]


@dataclasses.dataclass(frozen=True)
class SyntheticSummary:
    out_dir: Path
    train_csv: Path
    sample_submission_csv: Path
    stage2_csv: Path | None
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    train_positives: int
    test_positives: int
    elapsed_s: float

    @property
    def images_per_s(self) -> float:
        return (len(self.train_ids) + len(self.test_ids)) / max(self.elapsed_s, 1e-9)


def generate(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    mask_source: str | Path | None = None,
    difficulty: float = DEFAULT_DIFFICULTY,
    positive_fraction: float = DEFAULT_POSITIVE_FRACTION,
    stage2: bool = False,
    processes: int = 1,
    progress: bool = True,
) -> SyntheticSummary:
    """Writes a synthetic dataset in the challenge's layout (see the module docstring) into an empty ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; synthetic data goes into a new folder")
    check_unit_interval("positive_fraction", positive_fraction)
    check_unit_interval("difficulty", difficulty)
    source = None if mask_source is None else str(mask_source)
    if source is not None:
        load_mask_pool(source)  # fail early on a bad file
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [
        _Task(out_dir, seed, split, index, positive_fraction, difficulty, source)
        for split, count in (("train", n_train), ("test", n_test))
        for index in range(count)
    ]
    start = time.perf_counter()
    written = _run_tasks(tasks, processes, progress)
    elapsed = time.perf_counter() - start

    train = [case for case in written if case.split == "train"]
    test = [case for case in written if case.split == "test"]
    write_labels(out_dir / TRAIN_CSV, label_rows(train), ", ")
    write_labels(out_dir / SAMPLE_SUBMISSION_CSV, [(case.image_id, rle.EMPTY) for case in test], ",")
    stage2_csv = out_dir / STAGE2_CSV if stage2 else None
    if stage2_csv:
        write_labels(stage2_csv, label_rows(train + test), ",")
    return SyntheticSummary(
        out_dir=out_dir,
        train_csv=out_dir / TRAIN_CSV,
        sample_submission_csv=out_dir / SAMPLE_SUBMISSION_CSV,
        stage2_csv=stage2_csv,
        train_ids=tuple(case.image_id for case in train),
        test_ids=tuple(case.image_id for case in test),
        train_positives=sum(case.positive for case in train),
        test_positives=sum(case.positive for case in test),
        elapsed_s=elapsed,
    )


def _run_tasks(tasks: list[_Task], processes: int, progress: bool) -> list[_Written]:
    bar = functools.partial(tqdm, total=len(tasks), desc="synth", unit="img", disable=not progress)
    if processes <= 1:
        _keep_freed_memory()
        return list(bar(map(_write_case, tasks)))
    # forkserver, not fork: a child forked after OpenCV started its thread pool can deadlock
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # import once in the server, not once per worker
    with context.Pool(processes, initializer=_prepare_worker) as pool:
        return list(bar(pool.imap(_write_case, tasks, chunksize=4)))


# ---------------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="new (or empty) folder to write the dataset into")
    parser.add_argument("--n-train", type=int, default=100, help="training images (default 100)")
    parser.add_argument("--n-test", type=int, default=20, help="test images (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--mask-source", type=Path, help="label CSV(.gz) whose positive rows supply the masks")
    parser.add_argument(
        "--difficulty", type=float, default=DEFAULT_DIFFICULTY,
        help=f"0 = obvious .. 1 = no darkening nor pleural line, markings still absent (default {DEFAULT_DIFFICULTY})",
    )
    parser.add_argument("--positive-fraction", type=float, default=DEFAULT_POSITIVE_FRACTION, help="default 0.22")
    parser.add_argument("--stage2", action="store_true", help="also write stage_2_train.csv (train + test labels)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")


def run(args: argparse.Namespace) -> int:
    summary = generate(
        args.out, args.n_train, args.n_test, seed=args.seed, mask_source=args.mask_source,
        difficulty=args.difficulty, positive_fraction=args.positive_fraction, stage2=args.stage2,
        processes=args.processes,
    )
    print(
        f"wrote {len(summary.train_ids)} train ({summary.train_positives} positive) and {len(summary.test_ids)} test "
        f"({summary.test_positives} positive) images to {summary.out_dir} in {summary.elapsed_s:.1f} s "
        f"({summary.images_per_s:.1f} images/s)"
    )
    return 0
