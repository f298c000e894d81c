"""Plain helpers shared by the tests: small models, masks, synthetic-tree settings. Fixtures live in conftest.py;
`tiny_model` (a fast stand-in for the UNet), `dicom_factory` (DICOMs built in memory) and `bad_inputs` (the
corpus of bad files) are helper modules of their own."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import numpy as np
from flax import nnx
from PIL import Image
from pydicom.uid import generate_uid
from siim_jax.configs.defaults import default_data_config

from siim_jax.data.augment import model_input
from siim_jax.models import SegOutput, build_model, build_unfilled
from siim_jax.models.layers import BatchNorm
from tests import dicom_factory
from tests.multihost_worker import GRADIENT_ACCUMS

# The session's `synthetic_tree` (conftest.py): its size, and the image size the pipeline tests train at.
N_TRAIN, N_TEST = 12, 3
IMAGE_SIZE = 32


class Brightness(nnx.Module):
    """Mask logits that grow with the (normalised) input's brightness, so masks follow the bright pixels; with
    `class_head`, a class logit too (the mean mask logit)."""

    def __init__(self, class_head: bool = True):
        self.class_head = class_head

    def __call__(self, x, *, train):
        logits = 6.0 * x[..., :1] - 3.0
        return SegOutput(logits, logits.mean(axis=(1, 2)) if self.class_head else None)


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    """A boolean size x size mask holding one side x side square."""
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


# Issue 23's bound on the largest difference in probability between an exported model and `Inference`, float32.
# Measured: at most 4e-5 (tests/test_export.py), float32 round-off of the same network computed in another order.
EXPORT_TOLERANCE = 1e-4


def smooth_grey(shape, seed):
    """A smooth random radiograph-like uint8 image spanning 0..255."""
    pixels = cv2.GaussianBlur(np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32), (0, 0), 4)
    return cv2.normalize(pixels, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def calibrated_model(model_config, images):
    """A random UNet whose BatchNorm running statistics are those of its own activations on `images`, as a
    trained model's are. With the initial ones (mean 0, variance 1) activations grow through the deep encoders
    until the sigmoid saturates, and round-off in logits of thousands says nothing about a real model."""

    def state(images):
        model = build_model(model_config)
        for _, module in nnx.iter_modules(model):
            if isinstance(module, BatchNorm):
                module.momentum = 0.0  # the running statistics become this batch's
        model(model_input(images), train=True)
        return nnx.state(model)

    model = build_unfilled(model_config)
    nnx.update(model, jax.jit(state)(images))
    return model


def challenge_dice(pred_masks, true_masks) -> float:
    """The challenge's metric, written out as its definition: the mean over images of 2|X∩Y| / (|X| + |Y|), where
    an image whose masks are both empty scores 1. Masks are boolean, batch first."""
    scores = []
    for pred, truth in zip(np.asarray(pred_masks, bool), np.asarray(true_masks, bool), strict=True):
        total = pred.sum() + truth.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.logical_and(pred, truth).sum() / total)
    return float(np.mean(scores))


def read_png(path) -> np.ndarray:
    """An RGB PNG as a uint8 (H, W, 3) array, read with Pillow (the project writes them with OpenCV)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def corrupt_copy(tree: Path, destination: Path) -> tuple[Path, str]:
    """A copy of `tree` with one training DICOM truncated; returns the copy and that file's ImageId."""
    shutil.copytree(tree, destination)
    victim = sorted((destination / "dicom-images-train").rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:3000])
    return destination, victim.stem


def data_config(root: Path, **overrides):
    """The data config of the pipeline tests over `root`: IMAGE_SIZE, 3 folds, no prefetch."""
    config = default_data_config()
    config.root = str(root)
    config.image_size = IMAGE_SIZE
    config.n_folds = 3
    config.prefetch = 0
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


# ---- results of the data-parallel worker (tests/multihost_worker.py)

WORKER = Path(__file__).with_name("multihost_worker.py")  # the data-parallel worker of the sharding tests
# float32 round-off: a step's gradient differs from the reference by at most 9.5e-7 × the tensor's largest entry
# (8 float32 epsilons) in every layout measured; the bound is 10 times that. A gradient off by a factor c fails by
# |c - 1| / 1e-5: a sum over 2 devices where the mean belongs, or a micro-batch dropped, by more than 1e4 times.
GRADIENT_TOLERANCE = 1e-5

def run_worker(out: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(WORKER), str(out), *args], check=True, timeout=300)


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return dict(data)


def assert_same_params(actual: dict, expected: dict, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=atol, err_msg=name)


def entries(results: dict, prefix: str) -> dict[str, np.ndarray]:
    return {name.removeprefix(prefix): value for name, value in results.items() if name.startswith(prefix)}


def gradient_error(actual: dict, reference: dict) -> float:
    """max over tensors and entries of |actual - reference| / (GRADIENT_TOLERANCE × the tensor's max |reference|)."""
    assert actual.keys() == reference.keys()
    return max(
        float(np.max(np.abs(actual[name] - expected)) / (GRADIENT_TOLERANCE * np.max(np.abs(expected))))
        for name, expected in reference.items()
    )


def assert_gradients_match(results: dict, devices: int, references: dict) -> None:
    """Each micro-batch count's step gradient on `devices` devices is within the bound of its reference."""
    for accum in GRADIENT_ACCUMS:
        expected = entries(references, f"accum{accum}/reference")
        assert expected, f"no reference for {accum} micro-batches"
        error = gradient_error(entries(results, f"mesh{devices}/accum{accum}/gradient"), expected)
        assert error <= 1, f"{devices} devices, {accum} micro-batches: gradient off by {error:.3g} times its bound"


def top_left_lesion(shape: tuple[int, int]) -> np.ndarray:
    """A bool mask of `shape` (rows, columns) holding a rectangle in the top-left corner: the top quarter of the rows
    and the left third of the columns, so that a transposed or (width, height)-swapped copy lies elsewhere."""
    mask = np.zeros(shape, bool)
    mask[: shape[0] // 4, : shape[1] // 3] = True
    return mask


def write_lesion_dicom(path: Path, shape: tuple[int, int], photometric: str = "MONOCHROME2", **elements) -> Path:
    """A DICOM of `shape` that displays black with the `top_left_lesion` white (MONOCHROME1 stores it inverted),
    with the patient and study attributes a DICOM Segmentation references; its SOPInstanceUID is the file's stem
    unless given."""
    shown = np.where(top_left_lesion(shape), 255, 0).astype(np.uint8)
    stored = 255 - shown if photometric == "MONOCHROME1" else shown
    elements = {"SOPInstanceUID": path.stem, "StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
                "PatientName": "Test^Patient", "StudyDate": "20240101", "StudyTime": "120000", "StudyID": "1",
                "AccessionNumber": "A1", "PatientBirthDate": "", **elements}
    path.parent.mkdir(parents=True, exist_ok=True)
    dicom_factory.save(dicom_factory.dataset(stored, photometric, **elements), path)
    return path
