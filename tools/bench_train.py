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
as its last line one JSON object with every figure (also written to `--out`). Child logs go to `--logs`.

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

On the lent GPU machine (device tool `run`, carry [".whl"], timeout_s 600), after `bash ../shared/device/fetch-wheels.sh`:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 tools/bench_train.py --out $OUT/bench.json

The table, e2e and predict lines come back in the output; $OUT/bench.json has every figure and $OUT/bench_logs/
each part's log. Child environment: XLA_FLAGS gains `--xla_gpu_enable_latency_hiding_scheduler=true` (the one
flag JAX's and NVIDIA's GPU guides recommend; it schedules around collectives, so it matters only with several
GPUs) and `--xla-flags`; XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.9 (JAX preallocates; torch runs in its own
processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

STAGE2_IMAGES = 3205
GOAL_RATIO_TO_COMPILE = {"resnet50": 2.0, "se_resnext50_32x4d": 1.5}  # issue 8, at 512²
GOAL_E2E_FRACTION, GOAL_STAGE2_S = 0.9, 60.0
DEFAULT_BATCHES = {512: (32, 16), 1024: (8,)}
BCE_DICE = {"weights": {"bce": 1.0, "dice": 1.0}}  # the loss of the PyTorch reference runs, on both sides
# Datasheet dense bf16 matrix peaks, TFLOP/s, matched in order against jax's device_kind.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
MEASURED_H100_TFLOPS = 790.0  # the H100's measured bf16 matrix rate (shared/device/README.md)
# Usual seconds of each part on one H100 (startup + compile + timing), for the budget; guesses until measured.
ESTIMATE_S = {"jax": 75.0, "e2e": 35.0, "torch": 20.0, "torch_compile": 60.0, "predict": 40.0}


# ------------------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every part needs besides its own job; sent to the children as JSON."""

    smoke: bool
    steps: int
    warmup: int
    workers: int
    e2e_images: int
    e2e_steps: int
    predict_size: int
    predict_batch: int
    predict_batches: int
    cache: str


@dataclasses.dataclass(frozen=True)
class Job:
    kind: str  # 'probe', 'jax', 'torch' or 'predict'
    model: str = ""
    size: int = 0
    batch: int = 0
    compile: bool = False  # torch: also torch.compile
    e2e: bool = False  # jax: also the end-to-end run on the input pipeline

    @property
    def case(self) -> tuple[str, int, int]:
        return self.model, self.size, self.batch

    @property
    def label(self) -> str:
        if not self.model:
            return self.kind
        extras = "+compile" * self.compile + "+e2e" * self.e2e
        return f"{self.kind}{extras} {self.model} {self.size}²x{self.batch}"

    def estimate_s(self, smoke: bool) -> float:
        if smoke:
            return 0.0
        extras = ESTIMATE_S["torch_compile"] * self.compile + ESTIMATE_S["e2e"] * self.e2e
        return ESTIMATE_S.get(self.kind, 0.0) + extras


def batches_for(size: int, override: list[int] | None) -> tuple[int, ...]:
    if override:
        return tuple(override)
    return DEFAULT_BATCHES.get(size, (max(1, 8 * (1024 // size) ** 2),))


def select_cases(models, sizes, batches, every_case: bool) -> tuple[list[tuple], list[tuple]]:
    """(goal cases, other cases): each model's first size at its largest batch; the first model's (or with
    `every_case` every model's) other sizes and batches."""
    goals = [(model, sizes[0], max(batches_for(sizes[0], batches))) for model in models]
    others = [
        (model, size, batch)
        for index, model in enumerate(models)
        if index == 0 or every_case
        for size in sizes
        for batch in batches_for(size, batches)
        if (model, size, batch) not in goals
    ]
    return goals, others


def plan_jobs(args, settings: Settings) -> list[Job]:
    """Parts in priority order: the first model's goal case (jax with e2e, torch), predict, the other models'
    goal cases, then the remaining cases."""
    goals, others = select_cases(args.models, args.sizes, args.batches, args.every_case)
    compile_torch = not settings.smoke
    jobs = []
    for index, case in enumerate(goals):
        jobs.append(Job("jax", *case, e2e=index == 0 and not args.skip_e2e))
        jobs.append(Job("torch", *case, compile=compile_torch))
        if index == 0 and not args.skip_predict:
            jobs.append(Job("predict", args.models[0], settings.predict_size, settings.predict_batch))
    for case in others:
        jobs.append(Job("jax", *case))
        jobs.append(Job("torch", *case, compile=compile_torch and args.compile_all))
    return [job for job in jobs if not (args.skip_torch and job.kind == "torch")]


# ------------------------------------------------------------------------------------------------- children


class Skipped(Exception):
    """A part that cannot run here (a missing package, no CUDA for torch); the message says why."""


def _gigabytes(count) -> float | None:
    return None if count is None else count / 1e9


def timed_loop(run_step, finish, steps: int) -> float:
    """Seconds for `steps` calls of `run_step`, with one `finish` (a device sync) at the end."""
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    finish()
    return time.perf_counter() - start


def xla_flops(stage) -> float | None:
    """FLOP of one call by XLA's cost analysis of a lowered or compiled program (None where unavailable)."""
    try:
        analysis = stage.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"]) if analysis and analysis.get("flops", 0) > 0 else None


def device_report() -> dict:
    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count()}


def peak_device_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()  # None on the CPU
    return None if not stats else stats.get("peak_bytes_in_use")


def bench_model(job: Job):
    """The UNet of `job` in bfloat16 compute, without the classification head (smp.Unet has none)."""
    from siim_jax.models import default_model_config
    from siim_jax.train import init_model

    config = default_model_config()
    config.update({"encoder": job.model, "dtype": "bfloat16", "cls_head": False})
    return init_model(config, seed=0)


def random_batch(batch: int, size: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((batch, size, size, 3), np.float32),
        "mask": (rng.random((batch, size, size, 1)) < 0.5).astype(np.float32),
        "positive": np.ones(batch, np.float32),
    }


class StepRunner:
    """Calls a compiled train step, handing the state it returns (its input is donated) to the next call."""

    def __init__(self, compiled, state):
        self.compiled, self.state, self.metrics = compiled, state, None

    def __call__(self, batch: dict) -> None:
        self.state, self.metrics = self.compiled(self.state, batch)

    def sync(self) -> None:
        import jax

        jax.block_until_ready((self.state, self.metrics))


def step_memory_bytes(compiled) -> int | None:
    """Device bytes the compiled step plans for: arguments, outputs and temporaries, less the donated aliases."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    planned = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    return planned - memory.alias_size_in_bytes


def run_jax(job: Job, settings: Settings, report) -> dict:
    """The project's train step on a device-resident batch; then, with `job.e2e`, fed by the input pipeline."""
    import numpy as np

    from siim_jax import optim
    from siim_jax import sharding as sharding_lib
    from siim_jax.data import pipeline
    from siim_jax.losses import make_loss
    from siim_jax.train_state import create_train_state, make_train_step

    mesh = sharding_lib.data_mesh()
    optim_config = optim.default_optim_config()
    optimizer = optim.make_optimizer(optim_config)
    model_def, state = create_train_state(bench_model(job), optimizer, seed=0, ema=False)
    state = sharding_lib.replicate(state, mesh)
    schedule = optim.make_schedule(optim_config, settings.steps + settings.warmup)
    step = make_train_step(model_def, make_loss(BCE_DICE), optimizer, schedule, mesh)
    batch = pipeline.to_device(random_batch(job.batch, job.size), sharding_lib.batch_sharding(mesh))  # as e2e's

    start = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    # The program as written (the work asked for, comparable with PyTorch's FLOP counter), else as optimised.
    optimised_flops = xla_flops(compiled)
    flops = xla_flops(lowered) or optimised_flops

    runner = StepRunner(compiled, state)
    timed_loop(lambda: runner(batch), runner.sync, settings.warmup)
    seconds = timed_loop(lambda: runner(batch), runner.sync, settings.steps)
    loss = float(runner.metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    result = {
        **device_report(),
        "images_per_s": job.batch * settings.steps / seconds,
        "step_ms": 1e3 * seconds / settings.steps,
        "compile_s": compile_s,
        "flops_per_step": flops,
        "flops_per_step_optimised": optimised_flops,
        "gflop_per_image": None if flops is None else flops / job.batch / 1e9,
        "achieved_tflops": None if flops is None else flops * settings.steps / seconds / 1e12,
        "peak_gb": _gigabytes(peak_device_bytes()),
        "xla_step_memory_gb": _gigabytes(step_memory_bytes(compiled)),
        "loss": loss,
    }
    if job.e2e:
        report(result)  # the pure step survives a failure of the end-to-end run
        try:
            result["e2e"] = run_e2e(job, settings, runner, mesh, result["images_per_s"])
        except Exception as error:  # noqa: BLE001 - reported with the pure figures kept
            result["e2e"] = failure(error)
    return result


def prepared_synthetic(cache: Path, n_images: int, size: int):
    """(prepared dir, index frame) of `n_images` synthetic radiographs prepared at `size`, cached in `cache`."""
    import shutil

    from siim_jax.data import layout, synthetic, tfds_siim

    raw = cache / f"synthetic-{n_images}"
    if not (raw / layout.TRAIN_CSV).is_file():  # written last: its absence means an unfinished folder
        shutil.rmtree(raw, ignore_errors=True)
        processes = min(8, os.cpu_count() or 1, max(1, n_images // 8))
        synthetic.generate(raw, n_images, 0, seed=0, processes=processes, progress=False)
    prepared = cache / f"prepared-{n_images}"
    builder = tfds_siim.prepare(raw, size, prepared)  # a no-op when this size is already there
    return prepared, tfds_siim.index_frame(builder, "train").query("record >= 0")


def run_e2e(job: Job, settings: Settings, runner: StepRunner, mesh, pure_images_per_s: float) -> dict:
    """The compiled step fed by `train_iterator` (augmentation, workers, device prefetch) for `e2e_steps` steps.

    The frame lists the prepared images many times over so that one epoch covers the run (no iterator restart).
    Timing starts once as many batches as the workers and the device prefetch can hold have been consumed, so
    that batches made while the workers started up do not count.
    """
    import pandas as pd

    from siim_jax import sharding as sharding_lib
    from siim_jax.data import pipeline
    from siim_jax.train_state import TRAIN_INPUTS

    start = time.perf_counter()
    prepared, frame = prepared_synthetic(Path(settings.cache), settings.e2e_images, job.size)
    prepare_s = time.perf_counter() - start
    config = pipeline.default_data_config()
    config.update({"prepared_dir": str(prepared), "image_size": job.size, "workers": settings.workers})
    config.balance.mode = "none"
    buffered = settings.workers * config.prefetch + 2  # 2: the pipeline's device prefetch
    warmup = max(settings.warmup, buffered)
    frame = pd.concat([frame] * math.ceil((warmup + settings.e2e_steps) * job.batch / len(frame)), ignore_index=True)

    start = time.perf_counter()
    iterator = pipeline.train_iterator(config, frame, 0, job.batch, sharding=sharding_lib.batch_sharding(mesh))

    def fed_step():
        batch = next(iterator)
        runner({name: batch[name] for name in TRAIN_INPUTS})

    try:
        timed_loop(fed_step, runner.sync, 1)
        first_batch_s = time.perf_counter() - start
        timed_loop(fed_step, runner.sync, warmup - 1)
        seconds = timed_loop(fed_step, runner.sync, settings.e2e_steps)
    finally:
        iterator.close()
    images_per_s = job.batch * settings.e2e_steps / seconds
    return {
        "status": "ok",
        "images_per_s": images_per_s,
        "ratio_to_pure": images_per_s / pure_images_per_s,
        "workers": settings.workers,
        "warmup_steps": warmup,
        "steps": settings.e2e_steps,
        "distinct_images": settings.e2e_images,
        "first_batch_s": first_batch_s,
        "prepare_s": prepare_s,
    }


def run_predict(job: Job, settings: Settings, report) -> dict:
    """`Predictor` with hflip TTA: the next batch is dispatched before the previous one is fetched."""
    import numpy as np

    from siim_jax.predict import Predictor

    predictor = Predictor(bench_model(job), batch_size=job.batch, tta_hflip=True)
    images = np.random.default_rng(0).standard_normal((job.batch, job.size, job.size, 3), np.float32)
    start = time.perf_counter()
    predictor(images)
    compile_s = time.perf_counter() - start
    predictor(images)
    start = time.perf_counter()
    pending = predictor.dispatch(images)
    for _ in range(settings.predict_batches - 1):
        dispatched = predictor.dispatch(images)
        predictor.fetch(pending)
        pending = dispatched
    probs, _ = predictor.fetch(pending)
    seconds = time.perf_counter() - start
    if not np.isfinite(probs).all():
        raise FloatingPointError("non-finite probabilities")
    images_per_s = job.batch * settings.predict_batches / seconds
    return {
        **device_report(),
        "images_per_s": images_per_s,
        "stage2_projected_s": STAGE2_IMAGES / images_per_s,
        "compile_s": compile_s,
        "peak_gb": _gigabytes(peak_device_bytes()),
    }


def torch_loss(logits, masks):
    """BCE with logits + per-image soft Dice (smooth 1), as `make_loss(BCE_DICE)`, in float32."""
    import torch

    logits = logits.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
    probs = logits.sigmoid()
    dims = (1, 2, 3)
    dice = (2 * (probs * masks).sum(dims) + 1) / (probs.sum(dims) + masks.sum(dims) + 1)
    return bce + (1 - dice).mean()


def torch_mode(job: Job, settings: Settings, compiled: bool) -> dict:
    """One torch training mode from a fresh model: first step (with compilation), warm-up, timed steps."""
    import segmentation_models_pytorch as smp
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = smp.Unet(job.model, encoder_weights=None, classes=1).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(job.batch, 3, job.size, job.size, device=device, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last)
    masks = (torch.rand(job.batch, 1, job.size, job.size, device=device, generator=generator) < 0.5).float()
    losses = []

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            logits = forward(images)
        loss = torch_loss(logits, masks)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first_step_s = timed_loop(one_step, sync, 1)
    timed_loop(one_step, sync, settings.warmup)
    seconds = timed_loop(one_step, sync, settings.steps)
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    return {
        "status": "ok",
        "images_per_s": job.batch * settings.steps / seconds,
        "step_ms": 1e3 * seconds / settings.steps,
        "first_step_s": first_step_s,
        "peak_gb": _gigabytes(torch.cuda.max_memory_allocated()) if cuda else None,
        "precision": "bf16 autocast, channels_last" if cuda else "float32, channels_last",
        "loss": loss,
    }


def run_torch(job: Job, settings: Settings, report) -> dict:
    try:
        import segmentation_models_pytorch  # noqa: F401 - checked here, used by torch_mode
        import torch
    except ImportError as error:
        raise Skipped(f"PyTorch reference unavailable: {error}") from error
    if not settings.smoke and not torch.cuda.is_available():
        raise Skipped("torch sees no CUDA device")
    torch.backends.cudnn.benchmark = True
    result = {"torch_version": torch.__version__, "eager": torch_mode(job, settings, compiled=False)}
    if job.compile:
        report(result)  # eager survives a failing compile
        torch.cuda.empty_cache()
        try:
            result["compile"] = torch_mode(job, settings, compiled=True)
        except Exception as error:  # noqa: BLE001 - reported beside the eager figures
            result["compile"] = failure(error)
    return result


def run_probe(job: Job, settings: Settings, report) -> dict:
    from importlib import metadata

    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "grain", "torch", "segmentation-models-pytorch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {**device_report(), "versions": versions, "cpu_count": os.cpu_count()}


CHILDREN = {"probe": run_probe, "jax": run_jax, "torch": run_torch, "predict": run_predict}


def failure(error: BaseException) -> dict:
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, Skipped):
        return {"status": "skipped", "note": str(error)}
    out_of_memory = any(sign in text for sign in ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory"))
    return {"status": "OOM" if out_of_memory else "failed", "error": text[-2000:]}


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


# ------------------------------------------------------------------------------------------------------ parent


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
    command = [sys.executable, str(Path(__file__).resolve()), "--one", spec, "--result", str(result_path)]
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
        stopped = {"status": "timeout", "note": f"stopped after {timeout_s:.0f} s, the end of the budget"}
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
    """Runs the parts in order within the budget; a torch part follows its case's jax part into a skip."""
    done, skipped_cases = [], set()
    for index, job in enumerate(jobs):
        remaining = args.budget_s - (time.perf_counter() - started)
        estimate = job.estimate_s(settings.smoke)
        if job.kind == "torch" and job.case in skipped_cases:
            result = {"status": "skipped", "note": "its jax part was skipped"}
        elif remaining < max(estimate, 5.0):
            usual = f", usually takes {estimate:.0f} s" if estimate else ""
            result = {"status": "skipped", "note": f"budget: {remaining:.0f} s left{usual}"}
            skipped_cases.add(job.case)
        else:
            log_path = args.logs / f"{index:02d}-{job.label.replace(' ', '_').replace('²', '')}.log"
            result = run_child(job, settings, env, log_path, remaining)
        done.append((job, result))
        print(f"[{time.perf_counter() - started:5.0f} s] {job.label}: {progress_summary(result)}", flush=True)
    return done


def progress_summary(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')} {result.get('note') or result.get('error', '')[-300:]}".strip()
    parts = {"e2e": result.get("e2e"), "eager": result.get("eager"), "compile": result.get("compile")}
    if "images_per_s" in result:
        parts = {"step": result, **parts}
    rates = [f"{name} {cell(part, 'images_per_s', '.1f')}" for name, part in parts.items() if part]
    return f"ok, {', '.join(rates)} img/s" if rates else f"ok, {result.get('device_kind')}"


# -------------------------------------------------------------------------------------------------- assembling


def peak_tflops(device_kind: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_kind), None)


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    values = [(part or {}).get("images_per_s") for part in (numerator, denominator)]
    return values[0] / values[1] if all(values) else None


def assemble(done: list[tuple[Job, dict]], probe: dict, settings: Settings, notes: list[str]) -> dict:
    """Every figure as one JSON-ready dict: device, per-case jax / torch parts with ratios, e2e, predict."""
    cases, e2e, predict = {}, None, None
    peak = peak_tflops(probe.get("device_kind", ""))
    for job, result in done:
        if job.kind == "predict":
            predict = {"model": job.model, "size": job.size, "batch": job.batch, "tta_hflip": True, **result}
            continue
        case = cases.setdefault(job.case, {"model": job.model, "size": job.size, "batch": job.batch})
        if job.kind == "jax":
            jax_part = dict(result)
            if job.e2e:
                unfinished = {"status": result.get("status"), "note": "its jax part did not finish"}
                e2e = {"model": job.model, "size": job.size, "batch": job.batch, **jax_part.pop("e2e", unfinished)}
            achieved = jax_part.get("achieved_tflops")
            if peak and achieved:
                jax_part["fraction_of_peak"] = achieved / peak
            if achieved and "H100" in probe.get("device_kind", ""):
                jax_part["fraction_of_measured_h100"] = achieved / MEASURED_H100_TFLOPS
            case["jax"] = jax_part
        else:
            case["torch_eager"] = result.get("eager", result)
            unfinished = job.compile and result.get("status") != "ok"  # skipped, failed or stopped before eager
            case["torch_compile"] = result.get("compile", result if unfinished else {"status": "not run"})
    for case in cases.values():
        case["ratio_to_torch_eager"] = ratio(case.get("jax"), case.get("torch_eager"))
        case["ratio_to_torch_compile"] = ratio(case.get("jax"), case.get("torch_compile"))
    return {
        "mode": "smoke" if settings.smoke else "gpu",
        "device": {**probe, "peak_bf16_tflops": peak},
        "settings": dataclasses.asdict(settings),
        "cases": list(cases.values()),
        "e2e": e2e,
        "predict": predict,
        "goals": [] if settings.smoke else goals(list(cases.values()), e2e, predict),  # CPU figures prove nothing
        "notes": notes,
    }


def goals(cases: list[dict], e2e: dict | None, predict: dict | None) -> list[dict]:
    """The issue's goals that this run measured: each with its figure, its bound and whether it is met."""
    measured = [
        (f"{case['model']} 512²x{case['batch']} jax / torch.compile", case["ratio_to_torch_compile"],
         ">=", GOAL_RATIO_TO_COMPILE[case["model"]])
        for case in cases
        if case["model"] in GOAL_RATIO_TO_COMPILE and case["size"] == 512
        and case.get("torch_compile", {}).get("status") != "not run"
    ]  # fmt: skip
    if e2e and e2e.get("status") == "ok":
        measured.append(("e2e / pure step", e2e["ratio_to_pure"], ">=", GOAL_E2E_FRACTION))
    if predict and predict.get("status") == "ok" and predict["size"] == 1024:
        measured.append(("stage-2 prediction s", predict["stage2_projected_s"], "<=", GOAL_STAGE2_S))
    return [
        {"goal": name, "value": value, "bound": f"{sense} {bound}",
         "met": None if value is None else (value >= bound if sense == ">=" else value <= bound)}
        for name, value, sense, bound in measured
    ]  # fmt: skip


def number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cell(part: dict | None, key: str, spec: str) -> str:
    """A part's figure, or the part's status where it did not run to the end."""
    if not part:
        return "-"
    if part.get("status", "ok") != "ok":
        return str(part["status"])
    return number(part.get(key), spec)


def table(summary: dict) -> str:
    columns = ("model", "size", "batch", "jax img/s", "eager", "compile", "x eager", "x compile", "jax cmp s",
               "torch cmp s", "jax GB", "eager GB", "compile GB", "TFLOP/s", "% peak")  # fmt: skip
    rows = [columns]
    for case in summary["cases"]:
        jax_part, eager, compiled = case.get("jax"), case.get("torch_eager"), case.get("torch_compile")
        rows.append((
            case["model"], f"{case['size']}²", str(case["batch"]),
            cell(jax_part, "images_per_s", ".1f"), cell(eager, "images_per_s", ".1f"),
            cell(compiled, "images_per_s", ".1f"),
            number(case["ratio_to_torch_eager"], ".2f"), number(case["ratio_to_torch_compile"], ".2f"),
            cell(jax_part, "compile_s", ".0f"), cell(compiled, "first_step_s", ".0f"),
            cell(jax_part, "peak_gb", ".1f"), cell(eager, "peak_gb", ".1f"), cell(compiled, "peak_gb", ".1f"),
            cell(jax_part, "achieved_tflops", ".3g"), cell(jax_part, "fraction_of_peak", ".0%"),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(value.rjust(width) for value, width in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def part_line(name: str, part: dict, figures) -> str:
    """`name: figures()`, or `name: status` where the part did not run to the end (its reason is in the notes)."""
    return f"{name}: {figures() if part.get('status') == 'ok' else part.get('status')}"


def describe(summary: dict) -> str:
    device = summary["device"]
    versions = device.get("versions", {})
    peak = device.get("peak_bf16_tflops")
    lines = [
        f"{summary['mode']} run on {device.get('device_count', '?')} x {device.get('device_kind', '?')}"
        + (f" (dense bf16 peak {peak:.0f} TFLOP/s)" if peak else "")
        + f"; jax {versions.get('jax')}, flax {versions.get('flax')}, torch {versions.get('torch')}, "
        f"smp {versions.get('segmentation-models-pytorch')}",
        "jax: bf16 compute, f32 params, BCE+Dice, Adam, no class head | torch: smp.Unet, same loss; x = jax / torch",
        table(summary),
    ]
    e2e, predict = summary["e2e"], summary["predict"]
    if e2e:
        lines.append(part_line(
            f"e2e ({e2e['model']} {e2e['size']}²x{e2e['batch']}, {summary['settings']['workers']} workers)", e2e,
            lambda: f"{e2e['images_per_s']:.1f} img/s = {e2e['ratio_to_pure']:.0%} of the pure step (goal >= 90%), "
            f"first batch after {e2e['first_batch_s']:.1f} s",
        ))  # fmt: skip
    if predict:
        lines.append(part_line(
            f"predict ({predict['model']}, {predict['size']}², hflip TTA, batch {predict['batch']})", predict,
            lambda: f"{predict['images_per_s']:.1f} img/s, {STAGE2_IMAGES} images in "
            f"{predict['stage2_projected_s']:.1f} s (goal <= 60 s), compile {predict['compile_s']:.0f} s",
        ))  # fmt: skip
    lines.extend(
        f"goal: {goal['goal']} = {number(goal['value'], '.3g')} ({goal['bound']}): "
        f"{ {True: 'met', False: 'NOT met', None: 'not measured'}[goal['met']]}"
        for goal in summary["goals"]
    )
    lines.extend(f"note: {note}" for note in summary["notes"])
    return "\n".join(lines)


def problems(summary: dict) -> list[str]:
    """Every part that did not run to the end, with its reason."""
    parts = [(f"{c['model']} {c['size']}²x{c['batch']} {name}", c.get(name)) for c in summary["cases"]
             for name in ("jax", "torch_eager", "torch_compile")]  # fmt: skip
    parts += [("e2e", summary["e2e"]), ("predict", summary["predict"])]
    return [
        f"{name}: {part['status']} {part.get('note') or part.get('error', '')[:300]}".strip()
        for name, part in parts
        if part and part.get("status", "ok") not in ("ok", "not run")
    ]


# ---------------------------------------------------------------------------------------------- command line


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
