"""The input monitor of the training loop: a stalled input stops with the stage it waits on, within the timeout;
the fraction of time the device waited for input; grain workers that start together and never use a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siim_jax.data import pipeline
from siim_jax.training.feed import InputMonitor, InputStallError, stall_stage

from .helpers import data_config

FEED_WORKER = Path(__file__).with_name("feed_worker.py")


def progress(workers: int, loaded: int, transferred: int) -> pipeline.PipelineProgress:
    counts = pipeline.PipelineProgress()
    counts.workers, counts.loaded, counts.transferred = workers, loaded, transferred
    return counts


@pytest.mark.parametrize(
    "handed_out, counts, stage",
    [
        (1, progress(4, 1, 1), "worker start-up: worker 1 has not delivered its first batch (1 of 4 workers have)"),
        (6, progress(4, 6, 6), "a worker's element: batch 6, from worker 2 of 4"),
        (6, progress(4, 7, 6), "the device transfer of batch 6"),
        (3, progress(0, 3, 3), "loading batch 3 in this process (data.workers=0)"),
    ],
)
def test_the_stage_follows_from_the_pipeline_counters(handed_out, counts, stage):
    assert stall_stage(handed_out, counts) == stage


def stalling_after(batches: int):
    """Yields `batches` batches, then blocks for ever (as a hung worker would)."""
    yield from range(batches)
    threading.Event().wait()


def test_a_stalled_input_stops_naming_the_stage_and_the_batches_before_within_the_timeout():
    timeout = 0.5
    monitor = InputMonitor(stalling_after(3), 8, timeout, progress(2, 3, 3))
    assert [next(monitor) for _ in range(3)] == [0, 1, 2]
    start = time.perf_counter()
    with pytest.raises(InputStallError, match=r"waiting on a worker's element: batch 3, from worker 1 of 2; 3 batches"):
        next(monitor)
    # the consumer polls every 2 ms; 1 s more allows a loaded machine to reschedule it
    assert timeout <= time.perf_counter() - start < timeout + 1.0
    with pytest.raises(InputStallError):  # and stays stopped
        next(monitor)


def test_the_iterators_end_and_errors_reach_the_consumer():
    monitor = InputMonitor(iter([1, 2]), 1, 5.0)
    assert list(monitor) == [1, 2]

    def failing():
        yield 1
        raise ValueError("unreadable file x.dcm")

    monitor = InputMonitor(failing(), 1, 5.0)
    next(monitor)
    with pytest.raises(ValueError, match="x.dcm"):
        next(monitor)


def sleeping(seconds: float, batches: int):
    for index in range(batches):
        time.sleep(seconds)
        yield index


def test_a_slow_source_waits_nearly_all_the_time_and_a_fast_one_nearly_never():
    # Slow: 20 batches 50 ms apart with nothing else to do; all but the loop's own microseconds per batch is
    # waiting. 0.8 leaves 200 ms of the 1 s for thread wake-ups on a loaded 2-core machine.
    monitor = InputMonitor(sleeping(0.05, 20), 8, 10.0)
    for _ in monitor:
        pass
    slow = monitor.interval()
    assert slow["data_wait_fraction"] > 0.8
    assert slow["input_images_per_s"] == pytest.approx(8 / 0.05, rel=0.3)  # below 160: the sleeps are a minimum
    # Fast: batches ready at once, 50 ms of other work each: a wait is one thread hand-over (tens of µs); 0.1
    # allows 5 ms of rescheduling per batch.
    monitor = InputMonitor(iter(range(20)), 8, 10.0)
    for _ in monitor:
        time.sleep(0.05)
    assert monitor.interval()["data_wait_fraction"] < 0.1


@jax.jit
def busy_step(x):
    """Tens to hundreds of ms of device work on a CPU."""
    return jax.lax.fori_loop(0, 40, lambda _, y: jnp.tanh(y @ y) / 2, x)


def test_waiting_while_the_device_is_busy_is_not_waiting():
    # The source needs half a step per batch: the host (dispatching asynchronously) runs ahead and waits for the
    # source, but the device always has the next step queued and never idles.
    x = jnp.eye(384) * 0.5
    jax.block_until_ready(busy_step(x))
    start = time.perf_counter()
    jax.block_until_ready(busy_step(x))
    step_s = time.perf_counter() - start

    def fraction(track_device: bool) -> float:
        monitor = InputMonitor(sleeping(step_s / 2, 12), 1, 60.0)
        out = None
        for _ in monitor:
            out = busy_step(x)
            if track_device:
                monitor.step_dispatched(out)
        jax.block_until_ready(out)
        return monitor.interval()["data_wait_fraction"]

    # Counting every wait gives about 0.5 (the source's half step over the device's whole step); the device's
    # real idle time is the first batch's wait only, 1 of 24 half steps, 0.04.
    # Measured on a 2-core CPU: 0.57 and 0.64 counting every wait, 0.044 and 0.047 tracked. A loaded machine slows
    # the device, not the source's sleeps: that lowers both.
    assert fraction(track_device=False) > 0.2  # the trap this guards against
    assert fraction(track_device=True) < 0.15


def run_feed_worker(tmp_path, root, *args) -> dict:
    out = tmp_path / "feed.json"
    subprocess.run([sys.executable, str(FEED_WORKER), str(out), str(root), *args], check=True, timeout=600)
    return json.loads(out.read_text())


def test_more_workers_than_cores_start_together_and_feed_fake_devices(tmp_path, synthetic_tree):
    workers = len(os.sched_getaffinity(0)) + 2
    report = run_feed_worker(tmp_path, synthetic_tree, "--workers", str(workers), "--devices", "8",
                             "--batches", str(workers + 2), "--timeout", "300")
    assert report["error"] is None and report["batches"] == workers + 2
    assert len(report["spawned"]) == workers
    # grain on its own starts worker k only after worker k-1's first batch (issue 21): every one must have
    # started before any batch came
    assert max(report["spawned"]) < report["first_batch"]


def test_a_worker_that_never_delivers_stops_the_feed_naming_worker_start_up(tmp_path, synthetic_tree):
    fifo = tmp_path / "hung.dcm"
    os.mkfifo(fifo)
    report = run_feed_worker(tmp_path, synthetic_tree, "--workers", "2", "--devices", "2", "--batches", "3",
                             "--timeout", "5", "--stall-path", str(fifo))
    assert report["batches"] == 0
    assert "waiting on worker start-up: worker 0 has not delivered its first batch" in report["error"]
    assert "0 batches came before" in report["error"]
    assert 5 <= report["seconds"] < 10  # the timeout, and the 2 ms polls with a loaded machine's delays


def platform_of_a_worker(_):
    """The worker's JAX platform, and whether it imported torch (albumentations would, for nothing)."""
    import albumentations  # noqa: F401 - what TrainAugment imports in a worker

    return np.array([jax.devices()[0].platform, str(sys.modules.get("torch") is not None)])


def test_workers_run_jax_on_the_cpu_whatever_the_environment_says_and_skip_torch(monkeypatch, synthetic_tree):
    # A worker inherits the environment; one that set up a GPU backend would claim the memory the training
    # process holds. 'tpu' fails here at once if a worker honours it.
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    dataset = grain.MapDataset.range(2).map(platform_of_a_worker)
    iterator = pipeline._iterate(data_config(synthetic_tree, workers=1, prefetch=1), dataset, sharding=None)
    assert [list(map(str, element)) for element in iterator] == [["cpu", "False"]] * 2
    iterator.close()
