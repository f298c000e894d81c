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
from train_bench.measure import failure, run_jax, run_probe
from train_bench.peers import run_torch
from train_bench.plan import Job, Settings
from train_bench.prediction import run_predict
from train_bench.report import progress_summary

ENTRY_POINT = Path(__file__).resolve().parents[1] / "bench_train.py"  # a child runs it with --one

CHILDREN = {"probe": run_probe, "data": run_data, "jax": run_jax, "torch": run_torch, "predict": run_predict}
CPU_ONLY = {"data"}  # parts that must leave the GPU to the others (JAX would take most of its memory)


def write_json(path: Path, value: dict) -> None:
    """Replaces `path` at once, so that a reader (or a kill) never meets half a file."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value))
    partial.replace(path)


def child_main(spec: str, result_path: Path) -> int:
    """Runs one part and writes its result as JSON (rewritten as sub-parts finish)."""
    payload = json.loads(spec)
    job, settings = Job(**payload["job"]), Settings(**payload["settings"])

    def report(result: dict) -> None:
        write_json(result_path, {"status": "ok", **result})

    try:
        report(CHILDREN[job.kind](job, settings, report))
        return 0
    except Exception as error:  # noqa: BLE001 - the parent reports it and goes on with the next part
        traceback.print_exc()
        write_json(result_path, failure(error))
        return 1


def child_environment(extra_xla_flags: str) -> dict[str, str]:
    env = dict(os.environ)
    flags = [env.get("XLA_FLAGS", ""), "--xla_gpu_enable_latency_hiding_scheduler=true", extra_xla_flags]
    env["XLA_FLAGS"] = " ".join(flag for flag in flags if flag)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


def end_session(process: subprocess.Popen) -> None:
    """Kills what is left of a child's session (the child on a timeout; stray pipeline workers), then reaps it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_child(job: Job, settings: Settings, env: dict, log_path: Path, timeout_s: float) -> dict:
    """One part in a fresh process (its own session, so a timeout also ends its pipeline workers)."""
    result_path = log_path.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    spec = json.dumps({"job": dataclasses.asdict(job), "settings": dataclasses.asdict(settings)})
    command = [sys.executable, str(ENTRY_POINT), "--one", spec, "--result", str(result_path)]
    if job.kind in CPU_ONLY:
        env = {**env, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            process.wait(timeout=max(timeout_s, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        end_session(process)
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if timed_out:
        stopped = {"status": "timeout", "note": f"stopped after {timeout_s:.0f} s, its share of the budget"}
        if result is None:
            return stopped
        # A result written before the stop lacks only the sub-part that was running.
        pending = [key for key, wanted in (("e2e", job.e2e), ("compile", job.compile)) if wanted and key not in result]
        return {**result, **dict.fromkeys(pending, stopped)}
    if result is None:
        tail = log_path.read_text()[-1500:]
        return {"status": "failed", "error": f"exit code {process.returncode}, no result; log tail:\n{tail}"}
    return result


def run_plan(jobs: list[Job], settings: Settings, args, env: dict, started: float) -> list[tuple[Job, dict]]:
    """Runs the parts in order within the budget: a part whose estimate no longer fits is skipped (a torch part
    follows its case's jax part into a skip), a running one is stopped at its limit or at the budget's end."""
    done, skipped_cases = [], set()
    for index, job in enumerate(jobs):
        remaining = args.budget_s - (time.perf_counter() - started)
        estimate = job.estimate_s(settings.smoke)
        if job.kind == "torch" and job.case in skipped_cases:
            result = {"status": "skipped", "note": "its jax part was skipped"}
        elif remaining < max(estimate, 5.0):
            usual = f", usually takes {estimate:.0f} s" if estimate else ""
            result = {"status": "skipped", "note": f"budget: {max(remaining, 0):.0f} s left{usual}"}
            skipped_cases.add(job.case)
        else:
            log_path = args.logs / f"{index:02d}-{job.file_stem}.log"
            result = run_child(job, settings, env, log_path, min(remaining, job.limit_s(settings.smoke)))
        done.append((job, result))
        print(f"[{time.perf_counter() - started:5.0f} s] {job.label}: {progress_summary(result)}", flush=True)
    return done
