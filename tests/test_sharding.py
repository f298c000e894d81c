"""The data-parallel train step on 1, 2 and 8 CPU devices against one device without sharding.

One worker process with 8 devices runs the step on meshes of 1, 2 and 8 of them. The gradient a step applies is
compared with `multihost_worker.reference_gradient`, taken micro-batch by micro-batch on one device, for 1, 2
and 4 micro-batches. The comparison sees the gradient's scale (a sum over devices where the mean belongs, a
missing division by the micro-batch count, a dropped micro-batch), which parameters after Adam steps hide:
Adam's update barely depends on it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.multihost_worker import GRADIENT_ACCUMS

WORKER = Path(__file__).with_name("multihost_worker.py")
DEVICE_COUNTS = (1, 2, 8)
# float32 round-off: a step's gradient differs from the reference by at most 9.5e-7 × the tensor's largest entry
# (8 float32 epsilons) in every layout measured; the bound is 10 times that. A gradient off by a factor c fails by
# |c - 1| / 1e-5: a sum over 2 devices where the mean belongs, or a micro-batch dropped, by more than 1e4 times.
GRADIENT_TOLERANCE = 1e-5

pytestmark = pytest.mark.xdist_group("sharding")  # the module's tests share one worker run


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


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, np.ndarray]:
    """The worker's results on meshes of 1, 2 and 8 devices; the Adam runs with 1 and 2 micro-batches per step."""
    out = tmp_path_factory.mktemp("sharding") / "results.npz"
    run_worker(out, "--devices", "8", "--meshes", *map(str, DEVICE_COUNTS), "--accum", "1", "2")
    return load(out)


@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_step_gradient_matches_one_unsharded_device(results, devices):
    assert_gradients_match(results, devices, results)


def test_eight_devices_match_one_after_two_steps(results):
    one, eight = entries(results, "mesh1/"), entries(results, "mesh8/")
    assert_same_params(eight, one, atol=1e-5)  # with and without gradient accumulation
    initial = entries(results, "initial")
    moved = [name for name in one if "/final" in name and not np.allclose(one[name], initial[name.split("/final")[1]])]
    assert moved  # the steps did change the weights
