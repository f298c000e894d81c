"""One synthetic case: its identity, patient, image, mask and label rows."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pandas as pd

from siim_jax.data import rle
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
