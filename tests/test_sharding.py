"""The data-parallel step on 8 CPU devices gives the parameters of the same step on one device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("multihost_worker.py")


def run_worker(out: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(WORKER), str(out), *args], check=True, timeout=300)


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return dict(data)


def assert_same_params(actual: dict, expected: dict, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=atol, err_msg=name)


def test_eight_devices_match_one_after_two_steps(tmp_path):
    run_worker(tmp_path / "one.npz", "--devices", "1", "--accum", "1", "2")
    run_worker(tmp_path / "eight.npz", "--devices", "8", "--accum", "1", "2")
    one, eight = load(tmp_path / "one.npz"), load(tmp_path / "eight.npz")
    assert_same_params(eight, one, atol=1e-5)  # with and without gradient accumulation
    moved = [name for name in one if "/final" in name and not np.allclose(one[name], one["initial" + name.split("/final")[1]])]
    assert moved  # the steps did change the weights
