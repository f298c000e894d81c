"""Speed of siim-jax against the PyTorch reference on the machine it runs on: the train step, end-to-end training
and stage-2 prediction, within a fixed time budget (default 410 s: one H100/H200 run ends within 420 s).

Each part runs in a fresh subprocess, so that device memory, compile caches and out-of-memory failures stay with
their part:
  data           (CPU only) `siim-jax synth`: --e2e-images training and --predict-images test DICOMs at 1024²;
                 `siim-jax prepare` of the training images at the first size; a randomly initialised model
                 directory (bfloat16 compute, as `siim-jax convert` writes one) for predict. Kept in --cache.
  jax            the project's train step (`make_train_step`: forward, BCE + soft-Dice loss, backward, Adam) in
                 bfloat16 compute with float32 parameters, on one batch from the input pipeline kept on the
                 device: images/s, compile time (`lower` + `compile`), peak device memory, FLOP per step from
                 XLA's cost analysis and the achieved FLOP/s as a fraction of the card's dense bf16 peak;
  e2e            (first case) the same compiled step fed by the real pipeline (`train_iterator` on the prepared
                 set: augmentation, --workers processes, device prefetch), as a fraction of the pure step;
  torch eager    `segmentation_models_pytorch.Unet` (random init, Adam, the same loss), bf16 autocast,
                 channels_last, cudnn.benchmark; on the CPU float32 eager;
  torch compile  the same with `torch.compile(model)` (GPU only; the first step's time is its compile time);
  predict        what `siim-jax predict` runs (`Inference.from_checkpoint`, `predict_submission`: DICOM decoding,
                 hflip TTA, post-processing, RLE, the CSV) on the synthetic test DICOMs at --predict-size,
                 projected to the 3,205 images of stage 2 (see train_bench/prediction.py).
It prints one progress line per part, a table with the ratios siim-jax / PyTorch, the e2e, predict and goal lines
(the goals of issue 14: UNet-ResNet50 512² >= 2.0x torch.compile, UNet-SE-ResNeXt50 >= 1.5x, e2e >= 90% of the
pure step, stage 2 <= 60 s; judged on a GPU only) and, as its last line, one JSON object with every figure (also
written to --out). Every part's log and result, and the summary, are packed into ONE archive beside --out,
STEM_logs.tar.gz (a remote run returns only a few files, and none whose name holds '+').

Time budget. Parts run in priority order; one whose usual duration (ESTIMATE_S in train_bench/plan.py) no longer
fits in what is left of --budget-s is skipped and listed (a torch part goes with its jax part); a running one is
stopped at twice its estimate or at the budget's end, and reported as such. The default run and its estimated
H100 seconds (from shared/device/README.md: JAX compiles 40-75 s, torch.compile alike; smp eager 364 img/s):
  probe 10 | data 25 | jax UNet-ResNet50 512²x32 70 + e2e 20 | torch eager 15 + compile 60 |
  predict UNet-ResNet50 1024² batch 16, 32 + 32 + 320 images 60 | jax UNet-SE-ResNeXt50 512²x32 70 |
  torch eager 15 + compile 60                                                    = about 405 s of the 410.
More cases (`--sizes 512 1024`, `--batches 16 32`, `--every-case`) need a larger --budget-s.

No GPU visible to JAX (or --smoke): a smoke run at a tiny size (UNet-ResNet18, 64², batch 2, 2 steps, torch
float32 eager, e2e on 8 images with one worker, predict at 64² on 12 DICOMs): about 75 CPU-seconds, 1 to 4
minutes on a shared two-core machine.

    python tools/bench_train.py --smoke --out /tmp/bench/bench.json          # CPU smoke test
    python tools/bench_train.py --models resnet50 --skip-torch --skip-predict  # JAX train step and e2e only

On the GPU machine (docs/benchmarks/README.md): fetch the wheels it lacks with
`bash ../shared/device/fetch-wheels.sh` and the project's runtime dependencies missing from that script's list:
  tensorboardX pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle pyjpegls
  matplotlib contourpy cycler fonttools kiwisolver pyparsing
then run (device tool `run`, carry [".whl"], timeout_s 560):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD \
      && python3 -c "import siim_jax.training.loop, siim_jax.inference.predictor" \
      && python3 tools/bench_train.py --out $OUT/bench.json

$OUT/bench.json and $OUT/bench_logs.tar.gz come back. Child environment: XLA_FLAGS gains
`--xla_gpu_enable_latency_hiding_scheduler=true` (the one flag JAX's and NVIDIA's GPU guides recommend; it
schedules around collectives, so it matters only with several GPUs) and --xla-flags;
XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.9 (JAX preallocates; torch runs in its own processes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from train_bench.plan import Job, Settings, plan_jobs
from train_bench.report import assemble, describe, problems, progress_summary
from train_bench.run import child_environment, child_main, run_child, run_plan

PROBE_LIMIT_S = 60.0


def settings_from(args, smoke: bool) -> Settings:
    if smoke:
        return Settings(True, steps=2, warmup=1, workers=1, e2e_images=8, e2e_steps=2, predict_size=64,
                        predict_batch=2, predict_images=12, cache=str(args.cache))  # fmt: skip
    return Settings(False, args.steps, args.warmup, args.workers, args.e2e_images, args.e2e_steps, args.predict_size,
                    args.predict_batch, args.predict_images, str(args.cache))  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "se_resnext50_32x4d"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512])
    parser.add_argument("--batches", nargs="+", type=int, help="for every size (default 512: 32; 1024: 8)")
    parser.add_argument("--every-case", action="store_true", help="every size and batch for every model")
    parser.add_argument("--compile-all", action="store_true", help="torch.compile on every case, not only goals")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per part")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="e2e input processes")
    parser.add_argument("--e2e-images", type=int, default=128, help="synthetic training images (4/5 train e2e)")
    parser.add_argument("--e2e-steps", type=int, default=100)
    parser.add_argument("--predict-size", type=int, default=1024)
    parser.add_argument("--predict-batch", type=int, default=16)
    parser.add_argument("--predict-images", type=int, default=320, help="synthetic 1024² test DICOMs predicted")
    parser.add_argument("--budget-s", type=float, default=410.0, help="skip or stop parts past this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (automatic when JAX sees no GPU)")
    parser.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the jax parts")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "siim_jax_bench")
    parser.add_argument("--out", type=Path, help="also write the JSON here, and the logs beside it as STEM_logs.tar.gz")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        code = child_main(args.one, args.result)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: a stuck worker or thread cannot hold the part past its result
    started = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.logs = Path(tempfile.mkdtemp(prefix="logs-", dir=args.cache))
    env = child_environment(args.xla_flags)
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
    done = run_plan(plan_jobs(args, settings), settings, args, env, started)
    summary = assemble(done, probe, settings, notes)
    summary["notes"].extend(problems(summary))
    summary["logs"] = str(tarball_path(args))
    summary["elapsed_s"] = time.perf_counter() - started
    text = describe(summary)
    (args.logs / "summary.txt").write_text(text + "\n")
    (args.logs / "summary.json").write_text(json.dumps(summary, indent=1))
    pack_logs(args.logs, tarball_path(args))
    shutil.rmtree(args.logs)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
