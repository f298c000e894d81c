"""The data-parallel train step on 1, 2 and 8 CPU devices against one device without sharding.

One worker process with 8 devices runs the step on meshes of 1, 2 and 8 of them. The gradient a step applies is
compared with `multihost_worker.reference_gradient`, taken micro-batch by micro-batch on one device, for 1, 2
and 4 micro-batches. The comparison sees the gradient's scale (a sum over devices where the mean belongs, a
missing division by the micro-batch count, a dropped micro-batch), which parameters after Adam steps hide:
Adam's update barely depends on it.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import assert_gradients_match, assert_same_params, entries, load, run_worker

DEVICE_COUNTS = (1, 2, 8)
pytestmark = pytest.mark.xdist_group("sharding")  # the module's tests share one worker run


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
