"""The parts measured in a child process: the JAX train step, the end-to-end run on the input pipeline and the
probe. Heavy imports happen inside the parts, so that each child loads only its own."""

from __future__ import annotations

import math
import os
import time

from train_bench.data import bench_model_config, prepared_dir
from train_bench.plan import Job, Settings

BCE_DICE = {"weights": {"bce": 1.0, "dice": 1.0}}  # the loss of the PyTorch reference runs, on both sides


class Skipped(Exception):
    """A part that cannot run here (a missing package, no CUDA for torch); the message says why."""


def gigabytes(count) -> float | None:
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


def bench_data_config(settings: Settings, size: int, workers: int):
    """The data config of a training run on the prepared synthetic set, without class balancing."""
    from siim_jax.configs import defaults

    config = defaults.default_data_config()
    config.update({"prepared_dir": str(prepared_dir(settings, size)), "image_size": size, "workers": workers})
    config.balance.mode = "none"
    return config


def pipeline_batch(settings: Settings, size: int, batch_size: int, sharding) -> dict:
    """One training batch as the input pipeline hands it to the step (so the pure step sees the same shapes and
    dtypes as the end-to-end run), on the mesh."""
    from siim_jax.data import pipeline
    from siim_jax.training.state import TRAIN_INPUTS

    config = bench_data_config(settings, size, workers=0)
    iterator = pipeline.train_iterator(config, pipeline.build_datasets(config).train, [0], batch_size,
                                       sharding=sharding)  # fmt: skip
    try:
        batch = next(iterator)
    finally:
        iterator.close()
    return {name: batch[name] for name in TRAIN_INPUTS}


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
    from siim_jax.configs import defaults

    from siim_jax import sharding as sharding_lib
    from siim_jax.training import optim
    from siim_jax.training.loop import init_model
    from siim_jax.training.losses import make_loss
    from siim_jax.training.state import build_train_state, make_train_step

    mesh = sharding_lib.data_mesh()
    optim_config = defaults.default_optim_config()
    optimizer = optim.build_optimizer(optim_config)
    model_def, state = build_train_state(init_model(bench_model_config(job.model), seed=0), optimizer, seed=0,
                                         ema=False)  # fmt: skip
    state = sharding_lib.replicate(state, mesh)
    schedule = optim.make_schedule(optim_config, settings.steps + settings.warmup)
    step = make_train_step(model_def, make_loss(BCE_DICE), optimizer, schedule, mesh)
    batch = pipeline_batch(settings, job.size, job.batch, sharding_lib.batch_sharding(mesh))

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
        "peak_gb": gigabytes(peak_device_bytes()),
        "xla_step_memory_gb": gigabytes(step_memory_bytes(compiled)),
        "loss": loss,
    }
    if job.e2e:
        report(result)  # the pure step survives a failure of the end-to-end run
        try:
            result["e2e"] = run_e2e(job, settings, runner, mesh, result["images_per_s"])
        except Exception as error:  # noqa: BLE001 - reported with the pure figures kept
            result["e2e"] = failure(error)
    return result


def run_e2e(job: Job, settings: Settings, runner: StepRunner, mesh, pure_images_per_s: float) -> dict:
    """The compiled step fed by `train_iterator` (augmentation, `workers` processes, device prefetch) on the
    prepared synthetic set for `e2e_steps` steps, over as many epochs as that takes (no iterator restart).

    Timing starts once as many batches as the workers and the device prefetch can hold have been consumed, so
    that batches made while the workers started up do not count.
    """
    from siim_jax import sharding as sharding_lib
    from siim_jax.data import pipeline
    from siim_jax.training.state import TRAIN_INPUTS

    config = bench_data_config(settings, job.size, settings.workers)
    frame = pipeline.build_datasets(config).train
    buffered = settings.workers * config.prefetch + 2  # 2: the pipeline's device prefetch
    warmup = max(settings.warmup, buffered)
    epochs = math.ceil((warmup + settings.e2e_steps) / pipeline.steps_per_epoch(config, frame, 0, job.batch))

    start = time.perf_counter()
    iterator = pipeline.train_iterator(config, frame, range(epochs), job.batch,
                                       sharding=sharding_lib.batch_sharding(mesh))  # fmt: skip

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
        "train_images": len(frame),
        "first_batch_s": first_batch_s,
    }


def run_probe(job: Job, settings: Settings, report) -> dict:
    from importlib import metadata

    versions = {}
    packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets", "pydicom",
                "pylibjpeg", "albumentations", "torch", "segmentation-models-pytorch")  # fmt: skip
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {**device_report(), "versions": versions, "cpu_count": os.cpu_count()}


def failure(error: BaseException) -> dict:
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, Skipped):
        return {"status": "skipped", "note": str(error)}
    out_of_memory = any(sign in text for sign in ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory"))
    return {"status": "OOM" if out_of_memory else "failed", "error": text[-2000:]}
