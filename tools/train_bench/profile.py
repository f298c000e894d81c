"""The profile part (`--profile`): the baseline step traced for a few steps with `jax.profiler.trace`, as
shared/device/profile_step.py does it, and a kernel table by kind and the top kernels, in the run's archive.

Files (in the logs folder, so in the archive): PREFIX_kernels.txt (the table), PREFIX_hlo.txt.gz (the optimised
HLO, which names the fusions) and PREFIX_trace.json.gz (the Perfetto trace; ui.perfetto.dev opens it). On a GPU the
table lists the device's kernels (the trace's stream lines); where the trace has no device lines (the CPU), it
lists the host's XLA operations instead and says so.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import shutil
import tempfile
from pathlib import Path

from train_bench.data import bench_config
from train_bench.measure import build_jax_step, jax_mesh
from train_bench.plan import Job, Settings
from train_bench.rounds import log_phase, timed_loop

# Kinds of kernel, by the first pattern found in the name (lower case); the H200 names are in r50_kernels.txt.
KINDS = (
    ("conv/gemm", ("conv", "cudnn", "xmma", "implicit", "dgrad", "wgrad", "fprop", "sm90_", "sm80_", "gemm",
                   "cutlass", "nvjet", "dot")),
    ("transpose/copy", ("transpose", "copy", "nchwtonhwc", "nhwctonchw", "addpadding")),
    ("reduction fusion", ("reduce",)),
    ("scatter", ("scatter",)),
    ("elementwise fusion", ("fusion", "loop")),
    ("memcpy/memset", ("memset", "memcpy")),
)  # fmt: skip
TOP = 45


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, patterns in KINDS if any(pattern in low for pattern in patterns)), "other")


def kernel_table(events: list[tuple[str, float]], steps: int, top: int = TOP) -> str:
    """Device (or host) time per step by kind, and the `top` names by time: share, ms/step, calls/step."""
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for name, micros in events:
        by_name[name][0] += micros
        by_name[name][1] += 1
    total = sum(micros for micros, _ in by_name.values()) or 1.0
    kinds = collections.Counter()
    for name, (micros, _) in by_name.items():
        kinds[kind_of(name)] += micros
    lines = [f"time per step: {total / steps / 1e3:.2f} ms over {len(by_name)} names", "by kind:"]
    lines += [f"  {kind:20s} {100 * micros / total:5.1f} % {micros / steps / 1e3:8.2f} ms/step"
              for kind, micros in kinds.most_common()]  # fmt: skip
    lines.append(f"top {top}: share, ms/step, calls/step, name")
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    lines += [f"  {100 * micros / total:5.1f} % {micros / steps / 1e3:8.3f} {count / steps:6.1f}  {name[:150]}"
              for name, (micros, count) in ranked]  # fmt: skip
    return "\n".join(lines)


def trace_events(path: Path) -> tuple[str, list[tuple[str, float]]]:
    """(what they are, [(name, microseconds)]) of a Perfetto trace: the kernels of the device's stream lines, else
    every event of XLA's host threads (a CPU run), else every complete event with a duration."""
    with gzip.open(path, "rt") as file:
        trace = json.load(file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {event["pid"]: event.get("args", {}).get("name", "") for event in events
                 if event.get("ph") == "M" and event.get("name") == "process_name"}  # fmt: skip
    threads = {(event["pid"], event.get("tid")): event.get("args", {}).get("name", "") for event in events
               if event.get("ph") == "M" and event.get("name") == "thread_name"}  # fmt: skip
    complete = [event for event in events if event.get("ph") == "X" and "dur" in event]

    def line(event) -> str:
        return threads.get((event["pid"], event.get("tid")), "")

    device = [event for event in complete if "/device:" in processes.get(event["pid"], "")]
    groups = (
        ("device kernels", [event for event in device if line(event).lower().startswith("stream")]),
        ("device XLA ops", [event for event in device if line(event) == "XLA Ops"]),
        # XLA:CPU runs the program's thunks (fusions, convolutions) on its threads, named tf_XLA..., inside
        # ThunkExecutor spans that would count them twice.
        ("host XLA threads (no device lines in this trace)",
         [event for event in complete
          if line(event).startswith("tf_XLA") and not event["name"].startswith("ThunkExecutor")]),
        ("every event (no XLA Ops line in this trace)", complete),
    )
    what, chosen = next(((what, chosen) for what, chosen in groups if chosen), ("no events", []))
    return what, [(event["name"], float(event["dur"])) for event in chosen]


def run_profile(job: Job, settings: Settings, report) -> dict:
    """Builds the baseline step (from the persistent compilation cache the duel filled), times it, traces
    `settings.steps` steps and writes the table, the HLO and the trace into the logs folder."""
    import jax

    out, prefix = Path(settings.logs), f"profile_{job.model}_{job.size}x{job.batch}"
    log_phase("jax baseline: compile (the persistent cache's, if the duel ran)")
    step = build_jax_step(bench_config(job.model, job.batch), job.size, jax_mesh())
    with gzip.open(out / f"{prefix}_hlo.txt.gz", "wt") as file:
        file.write(step.runner.compiled.as_text())
    contestant = step.contestant("jax baseline")
    log_phase(f"warm-up ({settings.warmup} steps) after {step.compile_s:.1f} s of compiling")
    contestant.warm_up(settings.warmup)
    trace_dir = Path(tempfile.mkdtemp(prefix="trace-", dir=settings.cache))
    log_phase(f"trace of {settings.steps} steps")
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        traced_s = timed_loop(contestant.step, contestant.sync, settings.steps)
    found = glob.glob(str(trace_dir / "**" / "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"jax.profiler.trace wrote no perfetto_trace.json.gz under {trace_dir}")
    trace = out / f"{prefix}_trace.json.gz"
    shutil.copy(found[0], trace)
    shutil.rmtree(trace_dir)
    what, events = trace_events(trace)
    table = f"{job.label}, {settings.steps} traced steps, {what}\n{kernel_table(events, settings.steps)}\n"
    (out / f"{prefix}_kernels.txt").write_text(table)
    print(table, flush=True)
    log_phase("done")
    return {"files": [f"{prefix}_kernels.txt", f"{prefix}_hlo.txt.gz", trace.name],
            "events": what, "traced_events": len(events), "compile_s": step.compile_s,
            "traced_step_ms": 1e3 * traced_s / settings.steps, "step_ms": 1e3 * contestant.step_s}  # fmt: skip
