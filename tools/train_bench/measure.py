"""The parts measured in a child process: the duel (the project's train step, in each asked variant, against the
PyTorch reference in alternating rounds), the end-to-end run on the input pipeline and the probe. Heavy imports
happen inside the parts, so that each child loads only its own."""

from __future__ import annotations

import dataclasses
import math
import os
import time

from train_bench import variants
from train_bench.data import bench_config, prepared_dir
from train_bench.flops import jaxpr_flops
from train_bench.plan import ESTIMATE_S, Job, Settings
from train_bench.rounds import Contestant, alternate, log_phase, spread, timed_loop

BCE_DICE = {"weights": {"bce": 1.0, "dice": 1.0}}  # the loss of the PyTorch reference runs, on both sides
LOSS = "BCE with logits + per-image soft Dice (smooth 1), float32"
E2E_WINDOW = 10  # steps per timed window of the e2e part (one device sync each)
DEADLINE_MARGIN_S = 15.0  # a duel's last round ends this long before its part would be stopped
EXTRA_COMPILE_FRACTION = 0.5  # a variant's compile time over the baseline's, until one is measured


class Skipped(Exception):
    """A part that cannot run here (a missing package, no CUDA for torch); the message says why."""


def gigabytes(count) -> float | None:
    return None if count is None else count / 1e9


def device_report() -> dict:
    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count()}


def peak_device_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()  # None on the CPU
    return None if not stats else stats.get("peak_bytes_in_use")


def step_memory_bytes(compiled) -> int | None:
    """Device bytes the compiled step plans for: arguments, outputs and temporaries, less the donated aliases."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    planned = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    return planned - memory.alias_size_in_bytes


def synthetic_batch(size: int, batch_size: int, sharding) -> dict:
    """A training batch as the input pipeline hands one to the step (uint8 grey images and {0, 1} masks, float32
    `positive`; siim_jax/data/pipeline.py), random, on the mesh: the step's work does not depend on the values."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    masks = (rng.random((batch_size, size, size)) < 0.1).astype(np.uint8)
    host = {
        "image": rng.integers(0, 256, (batch_size, size, size), dtype=np.uint8),
        "mask": masks,
        "positive": masks.any(axis=(1, 2)).astype(np.float32),
    }
    return {name: jax.device_put(value, sharding) for name, value in host.items()}


class StepRunner:
    """Calls a compiled train step, handing the state it returns (its input is donated) to the next call."""

    def __init__(self, compiled, state):
        self.compiled, self.state, self.metrics = compiled, state, None

    def __call__(self, batch: dict) -> None:
        self.state, self.metrics = self.compiled(self.state, batch)

    def sync(self) -> None:
        import jax

        jax.block_until_ready((self.state, self.metrics))

    def loss(self) -> float:
        loss = float(self.metrics["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss}")
        return loss


@dataclasses.dataclass
class JaxStep:
    """One variant's compiled train step, its state and its batch, and what was learnt while building it."""

    runner: StepRunner
    batch: dict
    batch_size: int
    compile_s: float
    flops_per_step: float
    params: int
    model_input_shape: tuple[int, ...]
    planned_gb: float | None

    def contestant(self, name: str) -> Contestant:
        return Contestant(name, self.batch_size, lambda: self.runner(self.batch), self.runner.sync)


def build_jax_step(config, size: int, mesh) -> JaxStep:
    """The project's train step (`make_train_step`: forward, BCE + soft-Dice loss, backward, the optimizer) as
    `config` makes it, traced once: its jaxpr gives the FLOP count, its lowering the compiled program."""
    import jax

    from siim_jax import sharding as sharding_lib
    from siim_jax.data.augment import model_input
    from siim_jax.training import optim
    from siim_jax.training.loop import init_model
    from siim_jax.training.losses import make_loss
    from siim_jax.training.state import build_train_state, make_train_step

    optimizer = optim.build_optimizer(config.optim)
    model_def, state = build_train_state(init_model(config.model, seed=0), optimizer, seed=0, ema=False)
    state = sharding_lib.replicate(state, mesh)
    schedule = optim.make_schedule(config.optim, 1000)
    step = make_train_step(model_def, make_loss(BCE_DICE), optimizer, schedule, mesh, flatten=config.optim.flatten)
    batch = synthetic_batch(size, config.train.batch_size, sharding_lib.batch_sharding(mesh))
    start = time.perf_counter()
    traced = step.trace(state, batch)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    return JaxStep(
        runner=StepRunner(compiled, state),
        batch=batch,
        batch_size=config.train.batch_size,
        compile_s=compile_s,
        flops_per_step=jaxpr_flops(traced.jaxpr),
        params=sum(leaf.size for leaf in jax.tree.leaves(state.params)),
        model_input_shape=tuple(jax.eval_shape(model_input, batch["image"]).shape),
        planned_gb=gigabytes(step_memory_bytes(compiled)),
    )


def jax_mesh():
    from siim_jax import sharding as sharding_lib

    return sharding_lib.data_mesh()


def variant_result(step: JaxStep, contestant: Contestant, overrides: dict) -> dict:
    """A variant's figures: the spread of its rounds, its compile time, its work and its planned memory."""
    result = {
        "status": "ok",
        "overrides": overrides,
        "batch": step.batch_size,
        "compile_s": step.compile_s,
        "flops_per_image": step.flops_per_step / step.batch_size,
        "xla_step_memory_gb": step.planned_gb,
    }
    if contestant.rates:
        result.update(spread(contestant.rates), loss=step.runner.loss())
    return result


class Duel:
    """The contestants of one case and their results so far, reported after every phase and round."""

    def __init__(self, job: Job, settings: Settings, report):
        self.job, self.settings, self.report = job, settings, report
        self.deadline = time.perf_counter() + (job.limit_s or math.inf) - DEADLINE_MARGIN_S
        self.contestants: list[Contestant] = []
        self.jax_steps: dict[str, JaxStep] = {}
        self.torch_info: dict[str, dict] = {}
        self.result = {**device_report(), "variants": {}, "torch": {}}

    def round_cost_s(self, contestants: int) -> float:
        return self.settings.rounds * contestants * (self.settings.round_s + 0.5)

    def fits(self, estimate_s: float) -> bool:
        """Whether one more contestant that takes `estimate_s` to prepare still leaves time for every round."""
        left = self.deadline - time.perf_counter()
        return left >= estimate_s + self.round_cost_s(len(self.contestants) + 1)

    def compile_estimate_s(self) -> float:
        """What the next variant's compilation is expected to take: the longest of the other variants so far, or
        before any, half the baseline's (they reuse its autotuning results, in the process and in the cache)."""
        others = [step.compile_s for name, step in self.jax_steps.items() if name != variants.BASELINE]
        return max(others) if others else EXTRA_COMPILE_FRACTION * self.jax_steps[variants.BASELINE].compile_s

    def add_jax(self, name: str, mesh) -> None:
        overrides = variants.VARIANTS[name]
        estimate = self.compile_estimate_s() if self.jax_steps else 0.0
        if self.jax_steps and not self.fits(estimate):
            self.result["variants"][name] = {"status": "skipped", "note": f"budget: compiling takes ~{estimate:.0f} s"}
            return
        config = variants.apply(bench_config(self.job.model, self.job.batch), overrides)
        log_phase(f"jax {name}: compile")
        try:
            step = build_jax_step(config, self.job.size, mesh)
            contestant = step.contestant(f"jax {name}")
            log_phase(f"jax {name}: warm-up ({self.settings.warmup} steps) after {step.compile_s:.1f} s of compiling")
            contestant.warm_up(self.settings.warmup)
        except Exception as error:  # noqa: BLE001 - one variant's failure (OOM, a bug) leaves the others measured
            if name == variants.BASELINE:
                raise
            self.result["variants"][name] = {"overrides": overrides, **failure(error)}
            self.report(self.result)
            return
        self.jax_steps[name] = step
        self.contestants.append(contestant)
        self.result["variants"][name] = variant_result(step, contestant, overrides)
        self.report(self.result)

    def add_torch(self, mode: str) -> None:
        from train_bench.peers import torch_contestant

        estimate = 0.0 if self.settings.smoke else ESTIMATE_S[f"torch_{mode}"]
        if not self.fits(estimate):
            self.result["torch"][mode] = {"status": "skipped", "note": f"budget: usually takes {estimate:.0f} s"}
            return
        try:
            contestant, info = torch_contestant(self.job, self.settings, compiled=mode == "compile")
        except Exception as error:  # noqa: BLE001 - reported beside the other contestants
            self.result["torch"][mode] = failure(error)
            self.report(self.result)
            return
        self.contestants.append(contestant)
        self.torch_info[mode] = info
        self.result["torch"][mode] = {"status": "ok", **info()}
        self.report(self.result)

    def after_round(self, _: int) -> None:
        jax_contestants = {f"jax {name}": name for name in self.jax_steps}
        for contestant in self.contestants:
            if contestant.name in jax_contestants:
                name = jax_contestants[contestant.name]
                step = self.jax_steps[name]
                self.result["variants"][name] = variant_result(step, contestant, variants.VARIANTS[name])
            else:
                mode = contestant.name.removeprefix("torch ")
                self.result["torch"][mode] = {"status": "ok", **self.torch_info[mode](), **spread(contestant.rates)}
        self.result["peak_gb"] = gigabytes(peak_device_bytes())
        self.report(self.result)


def run_duel(job: Job, settings: Settings, report) -> dict:
    """The project's train step in each of `job.variants` (baseline first) against smp.Unet in `job.torch_modes`,
    timed in `settings.rounds` alternating rounds of `settings.round_s` seconds each. Variants past the part's time
    (their compile time estimated by the baseline's) are skipped, the least promising first."""
    from train_bench.peers import torch_work

    duel = Duel(job, settings, report)
    mesh = jax_mesh()
    duel.add_jax(variants.BASELINE, mesh)
    baseline = duel.jax_steps[variants.BASELINE]
    log_phase("torch: the work of one step (parameters, FLOP) on the meta device")
    duel.result["work"] = {
        "loss": LOSS,
        "jax_params": baseline.params,
        "jax_model_input": list(baseline.model_input_shape),  # NHWC
        "jax_flops_per_image": baseline.flops_per_step / baseline.batch_size,
    }
    try:
        duel.result["work"].update(torch_work(job))
    except Exception as error:  # noqa: BLE001 - the timings matter more than the cross-check
        duel.result["work"]["torch"] = failure(error)
    for mode in job.torch_modes:
        duel.add_torch(mode)
    others = [name for name in job.variants if name != variants.BASELINE]
    if others:  # the baseline's ratio first, in case a variant's compilation outlasts the part
        log_phase("rounds of the baseline and torch, before the variants")
        alternate(duel.contestants, settings.rounds, settings.round_s, duel.after_round)
        for contestant in duel.contestants:
            contestant.rates.clear()
    for name in others:
        duel.add_jax(name, mesh)
    alternate(duel.contestants, settings.rounds, settings.round_s, duel.after_round)
    log_phase("done")
    return duel.result


def bench_data_config(settings: Settings, size: int, workers: int):
    """The data config of a training run on the prepared synthetic set, without class balancing."""
    from siim_jax.configs import defaults

    config = defaults.default_data_config()
    config.update({"prepared_dir": str(prepared_dir(settings, size)), "image_size": size, "workers": workers})
    config.balance.mode = "none"
    return config


def run_e2e(job: Job, settings: Settings, report) -> dict:
    """The baseline step (from the persistent compilation cache, which the duel filled) fed by `train_iterator`
    (augmentation, `workers` processes, device prefetch) on the prepared synthetic set for `e2e_steps` steps.

    After as many batches as the workers and the device prefetch hold (made while the workers started), the steps
    are timed in windows of `E2E_WINDOW` steps, each ended by a device sync: the fraction of the window's wall time
    spent in `next(iterator)` is `data_wait_fraction`, the images per wall second the input rate.
    """
    from siim_jax import sharding as sharding_lib
    from siim_jax.data import pipeline
    from siim_jax.training.state import TRAIN_INPUTS

    mesh = jax_mesh()
    log_phase("jax baseline: compile (the persistent cache's, if the duel ran)")
    step = build_jax_step(bench_config(job.model, job.batch), job.size, mesh)
    config = bench_data_config(settings, job.size, settings.workers)
    frame = pipeline.build_datasets(config).train
    buffered = settings.workers * config.prefetch + 2  # 2: the pipeline's device prefetch
    warmup = max(settings.warmup, buffered)
    steps = math.ceil(settings.e2e_steps / E2E_WINDOW) * E2E_WINDOW
    epochs = math.ceil((warmup + steps) / pipeline.steps_per_epoch(config, frame, 0, job.batch))
    log_phase(f"iterator start: {settings.workers} workers, {epochs} epochs of {len(frame)} images")
    start = time.perf_counter()
    iterator = pipeline.train_iterator(config, frame, range(epochs), job.batch,
                                       sharding=sharding_lib.batch_sharding(mesh))  # fmt: skip
    waited = wall = 0.0

    def fed_step() -> None:
        nonlocal waited
        before = time.perf_counter()
        batch = next(iterator)
        waited += time.perf_counter() - before
        step.runner({name: batch[name] for name in TRAIN_INPUTS})

    result = {"workers": settings.workers, "warmup_steps": warmup, "train_images": len(frame),
              "compile_s": step.compile_s}  # fmt: skip
    try:
        timed_loop(fed_step, step.runner.sync, 1)
        result["first_batch_s"] = time.perf_counter() - start
        log_phase(f"first batch after {result['first_batch_s']:.1f} s; warm-up to step {warmup}")
        report(result)
        timed_loop(fed_step, step.runner.sync, warmup - 1)
        waited = 0.0
        for done in range(0, steps, E2E_WINDOW):
            log_phase(f"step {done}/{steps}")
            wall += timed_loop(fed_step, step.runner.sync, E2E_WINDOW)
            result.update(steps=done + E2E_WINDOW, input_images_per_s=job.batch * (done + E2E_WINDOW) / wall,
                          data_wait_fraction=waited / wall)  # fmt: skip
            report(result)
    finally:
        iterator.close()
    log_phase("done")
    return {**result, "loss": step.runner.loss()}


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
