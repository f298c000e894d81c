"""Who each case is: its UIDs, the patient fields of its header and its label, each a function of
(seed, split, index) alone."""

from __future__ import annotations

import dataclasses
import math
import uuid

import numpy as np
from pydicom.uid import generate_uid

DEFAULT_POSITIVE_FRACTION = 0.22
SPLIT_KEYS = {"train": 1, "test": 2}
PIXEL_SPACINGS = ("0.139", "0.143", "0.168", "0.171")


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
