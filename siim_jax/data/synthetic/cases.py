"""One synthetic case: its identity, patient, image, mask and label rows."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from siim_jax.data import rle
from siim_jax.data.synthetic.anatomy import IMAGE_SIZE
from siim_jax.data.synthetic.patients import (
    DEFAULT_POSITIVE_FRACTION,
    CaseIdentity,
    Patient,
    case_identity,
    case_rng,
    is_positive,
    sample_patient,
)
from siim_jax.data.synthetic.pneumothorax import mask_components
from siim_jax.data.synthetic.rendering import DEFAULT_DIFFICULTY, render_case


@dataclasses.dataclass(frozen=True)
class SyntheticCase:
    identity: CaseIdentity
    patient: Patient
    image: np.ndarray  # uint8 (Rows, Columns)
    mask: np.ndarray  # bool, the image's shape
    rles: tuple[str, ...]  # the label rows of this image, at its shape; ("-1",) when negative


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
    shape: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE),
) -> SyntheticCase:
    """Case ``index`` of ``split``, a function of its arguments alone, as an image of ``shape`` (Rows, Columns)."""
    check_shape(shape)
    rng = case_rng(seed, split, index)
    positive = is_positive(seed, split, index, positive_fraction)
    patient = sample_patient(rng)
    source_rles = None
    if positive and mask_source is not None:
        pool = load_mask_pool(str(mask_source))
        source_rles = pool[rng.integers(len(pool))]
    source_mask = rle.decode_merged(source_rles) if source_rles else None
    image, mask = render_case(rng, positive, difficulty, patient, source_mask)
    if tuple(shape) != (IMAGE_SIZE, IMAGE_SIZE):
        image, mask = _resized(image, mask, shape)
    elif source_rles:
        return SyntheticCase(case_identity(seed, split, index), patient, image, mask, source_rles)
    components = mask_components(mask)
    rles = tuple(rle.encode(component) for component in components) or (rle.EMPTY,)
    mask = np.any(components, axis=0) if components else np.zeros_like(mask)  # specks left out of the labels
    return SyntheticCase(case_identity(seed, split, index), patient, image, mask, rles)


def check_shape(shape: tuple[int, int]) -> None:
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"an image shape is (Rows, Columns), both positive; got {tuple(shape)}")


def _resized(image: np.ndarray, mask: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The 1024² rendering stretched to (rows, columns): the image area-averaged, the mask nearest."""
    rows, columns = shape
    image = cv2.resize(image, (columns, rows), interpolation=cv2.INTER_AREA)  # OpenCV sizes are (width, height)
    mask = cv2.resize(mask.view(np.uint8), (columns, rows), interpolation=cv2.INTER_NEAREST).astype(bool)
    return image, mask
