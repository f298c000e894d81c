"""Checkpoints saved on one set of devices load, predict and resume on another.

Each side is a fresh process with its own number of CPU devices (`tests/topology_worker.py`): a device that saved
a checkpoint need not exist where it is loaded, as when a model converted on a laptop is loaded on a GPU server.
The weights saved are constants (see the worker), so what a restore must give is known by hand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from siim_jax.data import pipeline
from siim_jax.training.checkpoints import TrainingCheckpoints
from siim_jax.training.state import TRAIN_INPUTS
from tests.helpers import entries, load
from tests.test_checkpoints import data_iterator, small_config, tiny_state
from tests.test_train import small_config as small_training_config
from tests.topology_worker import MODEL_VALUE, RUN_BATCH_STAT, run_value

WORKER = Path(__file__).with_name("topology_worker.py")
pytestmark = pytest.mark.xdist_group("topology")  # the module's tests share the saving workers' runs


def run_worker(*args, devices: int) -> None:
    subprocess.run([sys.executable, str(WORKER), *map(str, args), "--devices", str(devices)], check=True, timeout=300)


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory) -> Path:
    """Checkpoints saved in a process with 2 devices: replicated over both ('mesh'), and on device 1 alone."""
    directory = tmp_path_factory.mktemp("topology") / "two"
    run_worker("save", directory, devices=2)
    return directory


@pytest.fixture(scope="module")
def loaded_on_one(saved_on_two, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("topology") / "loaded.npz"
    run_worker("load", out, saved_on_two, devices=1)
    return load(out)


def assert_restored(results: dict, prefix: str) -> None:
    """Every restore of the checkpoints under `prefix` gives the weights saved (EMA ones from training runs), and
    prediction from them gives what the same weights set directly give."""
    averaged = (run_value(2) + run_value(1)) / 2  # the two steps with the best Dice
    wanted = {  # case: (parameters, batch statistics)
        "load_model": (MODEL_VALUE, MODEL_VALUE),
        "latest": (run_value(3) + 1, RUN_BATCH_STAT),
        "best": (run_value(2) + 1, RUN_BATCH_STAT),
        "average_top2": (averaged + 1, RUN_BATCH_STAT),
    }
    for case, (params, batch_stats) in wanted.items():
        np.testing.assert_array_equal(results[f"{prefix}/{case}/params"], params, err_msg=case)
        np.testing.assert_array_equal(results[f"{prefix}/{case}/batch_stats"], batch_stats, err_msg=case)
    for case in ("model_dir", "best"):
        np.testing.assert_array_equal(results[f"{prefix}/{case}/predicted"], results[f"{prefix}/{case}/expected"])


def test_checkpoints_saved_on_two_devices_load_on_one(loaded_on_one):
    assert_restored(loaded_on_one, "two/mesh")


def test_checkpoints_saved_from_device_1_of_2_load_on_one_device(loaded_on_one):
    assert_restored(loaded_on_one, "two/device1")


def test_checkpoints_saved_on_one_device_load_on_eight(tmp_path):
    run_worker("save", tmp_path / "one", devices=1)
    run_worker("load", tmp_path / "loaded.npz", tmp_path / "one", devices=8)
    assert_restored(load(tmp_path / "loaded.npz"), "one/mesh")


def recorded_steps(records: dict) -> list[int]:
    return sorted({int(name.split("/")[0]) for name in records if name[0].isdigit()})


def test_a_run_stopped_on_eight_devices_resumes_on_two_as_if_uninterrupted(synthetic_trees, tmp_path):
    config = small_training_config(synthetic_trees(24, seed=5, positive_fraction=0.5, difficulty=0.0),
                                   batch_size=8, eval_batch_size=8)  # 2 steps an epoch, 3 epochs
    config.data.workers = 0
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    args = (tmp_path / "config.json", tmp_path / "run")
    run_worker("train", *args, tmp_path / "stopped.npz", "--stop-after", 3, devices=8)  # mid-epoch
    run_worker("train", *args, tmp_path / "resumed.npz", devices=2)
    stopped, resumed = load(tmp_path / "stopped.npz"), load(tmp_path / "resumed.npz")
    assert (stopped["result_step"], stopped["stopped_by"]) == (3, "SIGTERM")
    assert (resumed["result_step"], resumed["stopped_by"]) == (6, "None")
    assert (recorded_steps(stopped), recorded_steps(resumed)) == ([1, 2, 3], [4, 5, 6])
    # Step 4 starts from the state step 3 ended with, bit for bit: weights, Adam moments, EMA, step, base key.
    before, after = entries(resumed, "4/before"), entries(stopped, "3/after")
    assert before.keys() == after.keys() and any("rng" in name for name in before)
    for name, value in after.items():
        np.testing.assert_array_equal(before[name], value, err_msg=name)
    # Each step's batch is the one an uninterrupted iterator over the run's epochs hands out at that step.
    splits = pipeline.build_datasets(config.data)
    uninterrupted = pipeline.train_iterator(config.data, splits.train, range(config.train.epochs), 8)
    for step, batch in zip(range(1, 7), uninterrupted, strict=False):
        records = stopped if step <= 3 else resumed
        for name in TRAIN_INPUTS:
            np.testing.assert_array_equal(records[f"{step}/batch/{name}"], batch[name], err_msg=f"{step} {name}")


def test_resuming_with_another_process_count_names_both_counts(tmp_path):
    with TrainingCheckpoints(tmp_path) as checkpoints:
        checkpoints.save(1, tiny_state(1), small_config(), data_iterator(position=5))
    saved = tmp_path / "1" / "data_iter"
    for index in range(2):  # what a run of 2 processes writes: each process its own position
        shutil.copy(saved / "process_0-of-1.json", saved / f"process_{index}-of-2.json")
    (saved / "process_0-of-1.json").unlink()
    with TrainingCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(ValueError, match="saved by 2 processes and this run has 1: .* resume it with 2"):
            checkpoints.restore_data_iterator(1, data_iterator())
