"""Small synthetic challenge trees for the data-pipeline tests (import the fixtures into a test module)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from siim_jax.configs.defaults import default_data_config
from siim_jax.data import synthetic

N_TRAIN, N_TEST = 12, 3
IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "tree"
    synthetic.generate(root, N_TRAIN, N_TEST, seed=3, progress=False)
    return root


def corrupt_copy(tree: Path, destination: Path) -> tuple[Path, str]:
    """A copy of `tree` with one training DICOM truncated; returns the copy and that file's ImageId."""
    shutil.copytree(tree, destination)
    victim = sorted((destination / "dicom-images-train").rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:3000])
    return destination, victim.stem


def data_config(root: Path, **overrides):
    config = default_data_config()
    config.root = str(root)
    config.image_size = IMAGE_SIZE
    config.n_folds = 3
    config.prefetch = 0
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
