"""Shared fixtures and the one way tests reach optional references (PyTorch and friends, the real challenge files).
Plain helpers (models, masks, configs) are in helpers.py.

A missing reference skips its tests on a developer's machine, but fails them when the environment variable CI is
"true": CI installs every reference and provides ../shared/siim-real, so a skip there means a check silently not run.
"""

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from tests.helpers import N_TEST, N_TRAIN

SIIM_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "siim-real"
REAL_DICOM = SIIM_REAL / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
REAL_LABELS = SIIM_REAL / "siim-pneumothorax-train-rle.csv.gz"


def missing_reference(reason: str) -> NoReturn:
    """Skips the calling test (or module) locally; fails it under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true needs every reference, so this test may not skip", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def reference_import(name: str) -> ModuleType:
    """Imports the reference module `name` (torch, timm, smp, sklearn, ...) or calls missing_reference."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        reason = f"reference module {name!r} cannot be imported ({error})"
    missing_reference(reason)  # outside the except block, so that a CI failure shows no chained traceback


@pytest.fixture(scope="session")
def siim_real() -> Path:
    if not SIIM_REAL.is_dir():
        missing_reference(f"real challenge files not found at {SIIM_REAL} (CI provides ../shared/siim-real)")
    return SIIM_REAL


@pytest.fixture(scope="session")
def synthetic_trees(tmp_path_factory) -> Callable[..., Path]:
    """`make(n_train, n_test=0, seed=0, **options)`: the synthetic challenge tree `synthetic.generate` writes with
    these arguments, written once a session. Shared: copy it before changing it."""
    from siim_jax.data import synthetic

    trees = {}

    def make(n_train: int, n_test: int = 0, seed: int = 0, **options) -> Path:
        key = (n_train, n_test, seed, tuple(sorted(options.items())))
        if key not in trees:
            root = tmp_path_factory.mktemp("synthetic") / "tree"
            synthetic.generate(root, n_train, n_test, seed=seed, progress=False, **options)
            trees[key] = root
        return trees[key]

    return make


@pytest.fixture(scope="session")
def synthetic_tree(synthetic_trees) -> Path:
    """The pipeline tests' tree: helpers.N_TRAIN training and N_TEST test images."""
    return synthetic_trees(N_TRAIN, N_TEST, seed=3)


@pytest.fixture
def tiny_model(monkeypatch):
    """Training builds `tests.tiny_model`'s tiny net in place of the UNet (for tests of the loop, not the net)."""
    from siim_jax import models
    from siim_jax.training import loop as train
    from tests.tiny_model import build_tiny_model

    monkeypatch.setattr(models, "build_model", build_tiny_model)
    monkeypatch.setattr(train, "build_model", build_tiny_model)
