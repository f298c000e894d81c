"""Bones and lung markings, drawn as polylines on the canvas and blurred into density layers."""

from __future__ import annotations

import math
from statistics import NormalDist

import cv2
import numpy as np

from siim_jax.data.synthetic.anatomy import CANVAS_SIZE, Anatomy, Lung, Pose

NORMAL_QUANTILES = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], np.float32)


def gaussian_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian noise (size x size), drawn as random bytes mapped through 256 normal quantiles: several times
    faster than ``standard_normal`` and fine for texture."""
    noise_bytes = np.frombuffer(rng.bytes(size * size), np.uint8).reshape(size, size)
    return cv2.LUT(noise_bytes, NORMAL_QUANTILES * sigma)


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
