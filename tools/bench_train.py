"""Train-step speed of siim-jax against the PyTorch reference, measured side by side on the machine it runs on.

For each case (encoder, size, batch) it measures, each part in a fresh subprocess so that peak memory, compile
caches and out-of-memory failures stay with their part:
  jax            the project's train step (`make_train_step`: forward, BCE + soft-Dice loss, backward, Adam) in
                 bfloat16 compute with float32 parameters, on a device-resident random batch: images/s, compile
                 time (`lower` + `compile`), peak device memory, FLOP per step from XLA's cost analysis and the
                 achieved FLOP/s as a fraction of the card's dense bf16 peak;
  torch eager    `segmentation_models_pytorch.Unet` (random init, Adam, the same loss), bf16 autocast,
                 channels_last, cudnn.benchmark; on the CPU float32 eager;
  torch compile  the same with `torch.compile(model)` (GPU only; the first step's time is its compile time);
and once each:
  e2e            the first case's compiled step fed by the real input pipeline (`train_iterator` on a prepared
                 synthetic set, `--workers` processes, batches put on the mesh), against the pure step;
  predict        `Predictor` at `--predict-size` with hflip TTA on random host arrays (device throughput plus the
                 host-device copies; DICOM decoding is measured by tools/bench_input.py), and the projected time
                 for the 3,205 images of stage 2.
It prints one progress line per part, a table with the ratios siim-jax / PyTorch, the e2e and predict lines, and
as its last line one JSON object with every figure (also written to `--out`). Child logs go to `--logs`. This
file is the command line; tools/train_bench/ holds the plan, the measured parts, the runner and the report.

Selection: every `--models` x `--sizes` x batches (512: 32 and 16; 1024: 8; `--batches` overrides) for the first
model, only the goal case (its first size and largest batch) for the others unless `--every-case`; torch.compile
on goal cases only unless `--compile-all`. Parts run in priority order: the first model's goal case (jax with e2e,
then torch eager + compile), predict, the other models' goal cases, then the remaining cases (jax, then torch
eager). A part whose usual duration (ESTIMATE_S) no longer fits in `--budget-s` is skipped and listed (a torch
part goes with its jax part), and a running part is stopped when the budget is spent; rerun what was skipped by
naming it, e.g. `--models resnet50 --sizes 1024 --batches 8 --skip-e2e --skip-predict`.

Default selection, with its guessed H100 seconds (JAX compiles 40-75 s per the device README, torch.compile alike):
  probe 5 | jax UNet-ResNet50 512²x32 + e2e (64 synthetic images prepared at 512², 14 workers, 130 steps) 110 |
  torch eager + compile of it 80 | predict UNet-ResNet50 1024², batch 16, 20 batches 40 |
  jax UNet-SE-ResNeXt50 512²x32 75 | torch eager + compile of it 80        = about 390 s for the goal figures;
  then UNet-ResNet50 512²x16 and 1024²x8 (jax 75 + torch eager 20 each) as far as the 450 s budget reaches.
With the pip install in front the command ends within 8 minutes.

No GPU visible to JAX (or `--smoke`): a smoke run at a tiny size (UNet-ResNet18, 64², batch 2, 2 steps, torch
float32 eager, 8-image e2e with one worker, predict at 64²): about 75 CPU-seconds, 1 to 4 minutes on a shared
two-core machine.

    python tools/bench_train.py --smoke --out /tmp/bench_smoke.json          # CPU smoke test
    python tools/bench_train.py --models resnet50 --sizes 1024 --skip-torch  # one model, one size, JAX only

On the lent GPU machine (device tool `run`, carry [".whl"], timeout_s 600), after
`bash ../shared/device/fetch-wheels.sh`, one command of two lines:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD && python3 tools/bench_train.py --out $OUT/bench.json

The table, e2e and predict lines come back in the output; $OUT/bench.json has every figure and $OUT/bench_logs/
each part's log. Child environment: XLA_FLAGS gains `--xla_gpu_enable_latency_hiding_scheduler=true` (the one
flag JAX's and NVIDIA's GPU guides recommend; it schedules around collectives, so it matters only with several
GPUs) and `--xla-flags`; XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.9 (JAX preallocates; torch runs in its own
processes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from train_bench.plan import Job, Settings, plan_jobs
from train_bench.report import assemble, describe, problems, progress_summary
from train_bench.run import child_environment, child_main, run_child, run_plan


def settings_from(args, smoke: bool) -> Settings:
    if smoke:
        return Settings(True, steps=2, warmup=1, workers=1, e2e_images=8, e2e_steps=2, predict_size=64,
                        predict_batch=2, predict_batches=2, cache=str(args.cache))  # fmt: skip
    return Settings(False, args.steps, args.warmup, args.workers, args.e2e_images, args.e2e_steps, args.predict_size,
                    args.predict_batch, args.predict_batches, str(args.cache))  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "se_resnext50_32x4d"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--batches", nargs="+", type=int, help="for every size (default 512: 32 16; 1024: 8)")
    parser.add_argument("--every-case", action="store_true", help="every size and batch for every model")
    parser.add_argument("--compile-all", action="store_true", help="torch.compile on every case, not only goals")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per part")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="e2e input processes")
    parser.add_argument("--e2e-images", type=int, default=64, help="distinct synthetic images for e2e")
    parser.add_argument("--e2e-steps", type=int, default=100)
    parser.add_argument("--predict-size", type=int, default=1024)
    parser.add_argument("--predict-batch", type=int, default=16)
    parser.add_argument("--predict-batches", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip or stop parts past this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (automatic when JAX sees no GPU)")
    parser.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the jax parts")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "siim_jax_bench")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--logs", type=Path, help="child logs (default: beside --out, else in --cache)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.logs is None:
        args.logs = args.out.with_name(args.out.stem + "_logs") if args.out else args.cache / "logs"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        code = child_main(args.one, args.result)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: a stuck worker or thread cannot hold the part past its result
    started = time.perf_counter()
    args.logs.mkdir(parents=True, exist_ok=True)
    env = child_environment(args.xla_flags)
    # The probe reads no settings; the smoke ones are as good as any.
    probe = run_child(Job("probe"), settings_from(args, smoke=True), env, args.logs / "probe.log", args.budget_s)
    print(f"[{time.perf_counter() - started:5.0f} s] probe: {progress_summary(probe)}", flush=True)
    notes = [] if probe.get("status") == "ok" else [f"probe: {probe.get('error')}"]
    smoke = args.smoke or probe.get("platform") != "gpu"
    if smoke:
        args.models, args.sizes, args.batches = ["resnet18"], [64], [2]
        reason = "asked" if args.smoke else "no GPU visible to JAX"
        notes.append(f"smoke mode ({reason}): tiny sizes, torch float32 eager, torch.compile skipped on CPU")
    settings = settings_from(args, smoke)
    done = run_plan(plan_jobs(args, settings), settings, args, env, started)
    summary = assemble(done, probe, settings, notes)
    summary["notes"].extend(problems(summary))
    summary["elapsed_s"] = time.perf_counter() - started
    print(describe(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
