"""Running the parts: each in a fresh subprocess with its own session, within the time budget."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from train_bench.data import run_data
from train_bench.measure import failure, run_duel, run_e2e, run_probe
from train_bench.plan import Job, Settings
from train_bench.prediction import run_predict
from train_bench.profile import run_profile
from train_bench.report import progress_summary

ENTRY_POINT = Path(__file__).resolve().parents[1] / "bench_train.py"  # a child runs it with --one

CHILDREN = {"probe": run_probe, "data": run_data, "duel": run_duel, "e2e": run_e2e, "predict": run_predict,
            "profile": run_profile}  # fmt: skip
CPU_ONLY = {"data"}  # parts that must leave the GPU to the others (JAX would take most of its memory)
SHARED_DEVICE = {"duel"}  # JAX and torch in one process: JAX allocates as it goes instead of 90% at once
POLL_S = 10.0  # how often the parent looks for a running part's new results


def write_json(path: Path, value: dict) -> None:
    """Replaces `path` at once, so that a reader (or a kill) never meets half a file."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value))
    partial.replace(path)


def child_main(spec: str, result_path: Path) -> int:
    """Runs one part and writes its result as JSON (rewritten as sub-parts finish)."""
    payload = json.loads(spec)
    job, settings = Job(**payload["job"]), Settings(**payload["settings"])
    last = {}

    def report(result: dict) -> None:
        last.update(result)
        write_json(result_path, {"status": "ok", **result})

    try:
        report(CHILDREN[job.kind](job, settings, report))
        return 0
    except Exception as error:  # noqa: BLE001 - the parent reports it and goes on with the next part
        traceback.print_exc()
        write_json(result_path, {**last, **failure(error)})  # what it measured before the failure stays
        return 1


def child_environment(extra_xla_flags: str, cache: Path) -> dict[str, str]:
    """The parts' environment: the XLA flags, and one persistent compilation cache (with XLA's autotuning results)
    that lets e2e and profile load the duel's step, and later variants reuse earlier ones' autotuning."""
    env = dict(os.environ)
    flags = [env.get("XLA_FLAGS", ""), "--xla_gpu_enable_latency_hiding_scheduler=true", extra_xla_flags]
    env["XLA_FLAGS"] = " ".join(flag for flag in flags if flag)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache / "jax-cache"))
    return env


def end_session(process: subprocess.Popen) -> None:
    """Kills what is left of a child's session (the child on a timeout; stray pipeline workers), then reaps it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def part_environment(job: Job, env: dict) -> dict:
    if job.kind in CPU_ONLY:
        return {**env, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    if job.kind in SHARED_DEVICE:
        return {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    return env


def read_result(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def wait_reporting(process: subprocess.Popen, timeout_s: float, result_path: Path, on_progress) -> bool:
    """Waits for `process` up to `timeout_s`, handing each new result it writes to `on_progress`; True if it ran
    out of time."""
    deadline = time.perf_counter() + max(timeout_s, 1.0)
    seen = None
    while True:
        try:
            process.wait(timeout=max(min(POLL_S, deadline - time.perf_counter()), 0.01))
            return False
        except subprocess.TimeoutExpired:
            if time.perf_counter() >= deadline:
                return True
        stamp = result_path.stat().st_mtime_ns if result_path.is_file() else None
        if stamp != seen and stamp is not None:
            seen = stamp
            on_progress({**read_result(result_path), "status": "running"})


def run_child(job: Job, settings: Settings, env: dict, log_path: Path, timeout_s: float, on_progress=None) -> dict:
    """One part in a fresh process (its own session, so a timeout also ends its pipeline workers). While it
    runs, `on_progress(partial result)` gets what it has reported so far, marked 'running'."""
    result_path = log_path.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    job = dataclasses.replace(job, limit_s=timeout_s)
    spec = json.dumps({"job": dataclasses.asdict(job), "settings": dataclasses.asdict(settings)})
    command = [sys.executable, str(ENTRY_POINT), "--one", spec, "--result", str(result_path)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=part_environment(job, env),
                                   start_new_session=True)  # fmt: skip
        try:
            timed_out = wait_reporting(process, timeout_s, result_path, on_progress or (lambda _: None))
        finally:  # also when the run itself is stopped (SIGTERM): no part outlives it
            end_session(process)
    result = read_result(result_path)
    if timed_out:
        stopped = {"status": "timeout", "note": f"stopped after {timeout_s:.0f} s, its share of the budget"}
        # A result written before the stop keeps what it measured; its status says it did not finish.
        return stopped if result is None else {**result, **stopped}
    if result is None:
        tail = log_path.read_text()[-1500:]
        return {"status": "failed", "error": f"exit code {process.returncode}, no result; log tail:\n{tail}"}
    return result


def partial_reporter(on_update, done: list, job: Job):
    return lambda partial: on_update([*done, (job, partial)])


def run_plan(jobs: list[Job], settings: Settings, args, env: dict, started: float, on_update) -> list[tuple]:
    """Runs the parts in order within the budget: a part whose estimate no longer fits is skipped, a running one
    is stopped at its limit or at the budget's end. `on_update(done)` gets the (job, result) pairs so far after
    every part, and while a part runs, with its partial result."""
    done = []
    for index, job in enumerate(jobs):
        remaining = args.budget_s - (time.perf_counter() - started)
        estimate = job.estimate_s(settings)
        # A duel of several variants needs its baseline and torch.compile, less than the whole estimate.
        needed = min(estimate, dataclasses.replace(job, variants=job.variants[:1]).estimate_s(settings))
        if remaining < max(needed, 5.0):
            usual = f", usually takes {needed:.0f} s" if needed else ""
            result = {"status": "skipped", "note": f"budget: {max(remaining, 0):.0f} s left{usual}"}
        else:
            log_path = args.logs / f"{index:02d}-{job.file_stem}.log"
            limit = job.limit_s_for(settings, remaining, jobs[index + 1 :])
            result = run_child(job, settings, env, log_path, limit, partial_reporter(on_update, done, job))
        done.append((job, result))
        print(f"[{time.perf_counter() - started:5.0f} s] {job.label}: {progress_summary(result)}", flush=True)
        on_update(done)
    return done
