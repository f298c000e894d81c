"""Shared fixtures: the real challenge files beside the project (skipped with a reason where absent)."""

from pathlib import Path

import pytest

SIIM_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "siim-real"
REAL_DICOM = SIIM_REAL / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
REAL_LABELS = SIIM_REAL / "siim-pneumothorax-train-rle.csv.gz"


@pytest.fixture(scope="session")
def siim_real() -> Path:
    if not SIIM_REAL.is_dir():
        pytest.skip(f"real challenge files not found at {SIIM_REAL} (CI provides ../shared/siim-real)")
    return SIIM_REAL
