"""The procedural body: pose, lungs, mediastinum and soft tissue, as smooth fields on a coarse grid."""

from __future__ import annotations

import dataclasses
import functools
import math

import cv2
import numpy as np

from siim_jax.data.synthetic.patients import Patient

IMAGE_SIZE = 1024
FIELD_SIZE = 256  # smooth anatomy (outlines, densities, the pneumothorax's shape) is evaluated on this grid
CANVAS_SIZE = 512  # ribs and lung markings are drawn here; the pleural line and noise are added at full size
LUNG_TAPER = 0.2  # how much narrower than an ellipse the lungs are at the apex (and broader at the base)


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


def resize(layer: np.ndarray, size: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    return cv2.resize(layer, (size, size), interpolation=interpolation)
