"""Speed of siim-jax against the PyTorch reference on the machine it runs on: the train step (and its variants),
end-to-end training and stage-2 prediction, within a time budget (default 505 s: one H200 run, the wheels'
install included, ends within 9 minutes). docs/benchmarks/README.md has the plan and the GPU commands.

Each part runs in a fresh subprocess, so that device memory and failures stay with their part; all share one
persistent compilation cache (--cache/jax-cache), so that later parts load the step the duel compiled:
  data     (CPU only) `siim-jax synth`, `siim-jax prepare` at the first size, a random model directory.
  duel     per model: the project's train step (`make_train_step`: bf16 compute, f32 parameters, BCE + soft Dice,
           Adam) in each --variants (train_bench/variants.py; baseline first) against smp.Unet under
           torch.compile (and eager for the first model), all in one process, timed in --rounds ALTERNATING rounds
           of at least --round-s seconds each: the median, extremes and IQR per contestant, ratios from the medians.
           The work of both sides is reported beside: parameter counts, model input shapes, and FLOP per image
           counted on the step's jaxpr (train_bench/flops.py; XLA's cost analysis misses cuDNN's convolutions)
           and by PyTorch's FlopCounterMode (its grouped-convolution weight gradient corrected), from which
           TFLOP/s and the fraction of the card's dense bf16 peak.
  e2e      the baseline step fed by `train_iterator` (augmentation, --workers processes, device prefetch):
           input images/s, data_wait_fraction (time in next(iterator) over wall time, per window of 10 steps
           ended by a device sync) and the time to the first batch; logged every 10 steps.
  predict  what `siim-jax predict` runs on the synthetic 1024² test DICOMs, projected to stage 2's 3,205 images.
  profile  (--profile) the baseline step traced with jax.profiler: kernels by kind, top kernels, HLO, trace.
A variants run (--variants with more than the baseline) measures the duels only. Each sub-phase is logged with a
timestamp as it starts (compile, warm-up, each timed round, the e2e iterator's start, first batch, every 10
steps), and the JSON and the archive are rewritten after every part and while one runs (every 10 s when it has
reported something new), so a run stopped at any moment returns what it measured.

Time budget: parts run in priority order (data, the duels, e2e, predict, profile); one whose estimate (ESTIMATE_S
and JAX_COMPILE_S in train_bench/plan.py, measured on the H200) no longer fits is skipped and listed; a running
one is stopped at twice its estimate or the budget's end. A duel of several variants gets an equal share of
what is left per remaining duel and drops the variants whose compilation no longer fits, the least promising
(last in variants.py) first.

No GPU visible to JAX (or --smoke): a smoke run at a tiny size (UNet-ResNet18, 64², batch 2, rounds of a couple
of steps, torch float32 eager, e2e on 8 images with one worker, predict at 64² on 12 DICOMs).

    python tools/bench_train.py --smoke --out /tmp/bench/bench.json                   # CPU smoke test
    python tools/bench_train.py --smoke --variants remat,bn_fused --profile           # variants and profile

$OUT/bench.json and $OUT/bench_logs.tar.gz come back from a GPU run. Child environment: XLA_FLAGS gains
`--xla_gpu_enable_latency_hiding_scheduler=true` and --xla-flags; XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.9,
except in the duel, where JAX and torch share the device and JAX allocates as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from train_bench.plan import Job, Settings, plan_jobs
from train_bench.report import assemble, describe, problems, progress_summary
from train_bench.run import child_environment, child_main, run_child, run_plan
from train_bench.variants import BASELINE, resolve

PROBE_LIMIT_S = 60.0
SMOKE_ROUND_S = 0.05  # a smoke round: a couple of steps on the CPU


def settings_from(args, smoke: bool) -> Settings:
    if smoke:
        return Settings(True, steps=2, warmup=1, workers=1, e2e_images=8, e2e_steps=2, predict_size=64,
                        predict_batch=2, predict_images=12, cache=str(args.cache), rounds=args.rounds,
                        round_s=SMOKE_ROUND_S, logs=str(args.logs))  # fmt: skip
    return Settings(False, args.steps, args.warmup, args.workers, args.e2e_images, args.e2e_steps, args.predict_size,
                    args.predict_batch, args.predict_images, str(args.cache), args.rounds, args.round_s,
                    str(args.logs))  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "se_resnext50_32x4d"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512])
    parser.add_argument("--batches", nargs="+", type=int, help="for every size (default 512: 32; 1024: 8)")
    parser.add_argument("--every-case", action="store_true", help="every size and batch for every model")
    parser.add_argument("--variants", default=BASELINE,
                        help="jax step variants to time against torch.compile: NAME[,NAME...] or 'all' "
                        "(train_bench/variants.py); more than the baseline skips data, e2e and predict")
    parser.add_argument("--eager-all", action="store_true", help="torch eager for every model, not the first only")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per contestant")
    parser.add_argument("--round-s", type=float, default=2.0, help="seconds of each timed round (at least)")
    parser.add_argument("--profile", action="store_true", help="trace the baseline step: a kernel table, HLO, trace")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="profile: traced steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="e2e input processes")
    parser.add_argument("--e2e-images", type=int, default=128, help="synthetic training images (4/5 train e2e)")
    parser.add_argument("--e2e-steps", type=int, default=50, help="timed fed steps, in windows of 10")
    parser.add_argument("--predict-size", type=int, default=1024)
    parser.add_argument("--predict-batch", type=int, default=16)
    parser.add_argument("--predict-images", type=int, default=320, help="synthetic 1024² test DICOMs predicted")
    parser.add_argument("--budget-s", type=float, default=505.0, help="skip or stop parts past this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (automatic when JAX sees no GPU)")
    parser.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the jax parts")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "siim_jax_bench")
    parser.add_argument("--out", type=Path, help="also write the JSON here, and the logs beside it as STEM_logs.tar.gz")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variant_names = resolve(args.variants)
    variants_run = len(args.variant_names) > 1
    args.e2e, args.predict = not (args.skip_e2e or variants_run), not (args.skip_predict or variants_run)
    return args


def tarball_path(args) -> Path:
    """Where the logs go: beside `--out`, else in the cache folder."""
    out = args.out or args.cache / "bench.json"
    return out.with_name(out.stem + "_logs.tar.gz")


def pack_logs(logs: Path, tarball: Path) -> None:
    """Every log and part result in one archive (a remote run returns a few files only), written atomically."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(tarball.name + ".partial")
    with tarfile.open(partial, "w:gz") as archive:
        archive.add(logs, arcname=tarball.name.removesuffix(".tar.gz"))
    partial.replace(tarball)


def write_results(args, done, probe: dict, settings: Settings, notes: list[str], started: float) -> dict:
    """The JSON (--out) and the archive of every log as they stand: called after every part and while one runs,
    so that a run stopped at any moment returns what it measured."""
    summary = assemble(done, probe, settings, notes)
    summary["notes"] = notes + problems(summary)
    summary["logs"] = str(tarball_path(args))
    summary["elapsed_s"] = time.perf_counter() - started
    text = describe(summary)
    (args.logs / "summary.txt").write_text(text + "\n")
    (args.logs / "summary.json").write_text(json.dumps(summary, indent=1))
    pack_logs(args.logs, tarball_path(args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps(summary, indent=1))
        partial.replace(args.out)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        code = child_main(args.one, args.result)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: a stuck worker or thread cannot hold the part past its result
    # SIGTERM (a `timeout`, a job's stop) unwinds like an error: the running part's session is ended, and the JSON
    # and archive written after the last part stay.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.logs = Path(tempfile.mkdtemp(prefix="logs-", dir=args.cache))
    env = child_environment(args.xla_flags, args.cache)
    # The probe reads no settings; the smoke ones are as good as any.
    probe_limit = min(args.budget_s, PROBE_LIMIT_S)
    probe = run_child(Job("probe"), settings_from(args, smoke=True), env, args.logs / "probe.log", probe_limit)
    print(f"[{time.perf_counter() - started:5.0f} s] probe: {progress_summary(probe)}", flush=True)
    notes = [] if probe.get("status") == "ok" else [f"probe: {probe.get('error')}"]
    smoke = args.smoke or probe.get("platform") != "gpu"
    if smoke:
        args.models, args.sizes, args.batches = ["resnet18"], [64], [2]
        reason = "asked" if args.smoke else "no GPU visible to JAX"
        notes.append(f"smoke mode ({reason}): tiny sizes, torch float32 eager, torch.compile skipped on CPU")
    settings = settings_from(args, smoke)

    def on_update(done):
        write_results(args, done, probe, settings, notes, started)

    done = run_plan(plan_jobs(args, settings), settings, args, env, started, on_update)
    summary = write_results(args, done, probe, settings, notes, started)
    shutil.rmtree(args.logs)
    print(describe(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
