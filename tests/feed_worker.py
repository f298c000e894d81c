"""Feeds `train_iterator` batches onto fake CPU devices through an InputMonitor and reports when things happened.

    python tests/feed_worker.py OUT.json ROOT --workers W --devices D --batches B --timeout S [--stall-path P]

ROOT is a synthetic challenge tree; the pipeline decodes its DICOMs on the fly (image size 32, batch 8) with W
worker processes and the device prefetch onto a mesh of D fake CPU devices. With --stall-path, every training
image's path is replaced by P (a FIFO no one writes to: opening it blocks for ever, as a hung network file
system would). OUT.json: {'spawned': each worker's start (time.time()), 'first_batch': when the first batch came,
'batches': how many came, 'first_batch_s', 'error': the InputStallError's message or null, 'seconds': the
monitor's wait for its first batch or its stall}. Run by test_feed.py in a fresh interpreter: the device count is
fixed at JAX start-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path


def process_start(pid: int) -> float:
    """When process `pid` started, as time.time() (from /proc, in clock ticks since boot)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("root")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--stall-path")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import jax

    from siim_jax import sharding as sharding_lib
    from siim_jax.data import pipeline
    from siim_jax.training.feed import InputMonitor, InputStallError
    from tests.helpers import data_config

    assert jax.device_count() == args.devices
    config = data_config(Path(args.root), workers=args.workers, prefetch=1)
    config.balance.mode = "none"
    frame = pipeline.build_datasets(config).train
    if args.stall_path:
        frame = frame.assign(path=args.stall_path)
    progress = pipeline.PipelineProgress()
    iterator = pipeline.train_iterator(config, frame, range(50), 8, sharding=sharding_lib.batch_sharding(
        sharding_lib.data_mesh()), progress=progress)
    monitor = InputMonitor(iterator, 8, args.timeout, progress)
    report = {"error": None, "first_batch": None}
    started = time.perf_counter()
    try:
        for _ in range(args.batches):
            next(monitor)
            report["first_batch"] = report["first_batch"] or time.time()
    except InputStallError as error:
        report["error"] = str(error)
    report.update(seconds=time.perf_counter() - started, batches=monitor.batches, first_batch_s=monitor.first_batch_s,
                  spawned=sorted(process_start(child.pid) for child in multiprocessing.active_children()))
    Path(args.out).write_text(json.dumps(report))
    for child in multiprocessing.active_children():
        child.kill()  # a worker blocked on the FIFO would never see grain's request to stop
    os._exit(0)


if __name__ == "__main__":
    main()
