"""The inputs the parts read, made by the project's own commands and kept in the cache folder: a synthetic
challenge tree (`siim-jax synth`: 1024² JPEG DICOMs like the challenge's), its TFDS cache at the training size
(`siim-jax prepare`) and a randomly initialised model directory for `predict`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from train_bench.plan import Job, Settings


def siim_jax_command(*args) -> None:
    """Runs `siim-jax ARGS...` with this interpreter; its output goes to the part's log."""
    sys.stdout.flush()
    subprocess.run([sys.executable, "-m", "siim_jax.cli", *map(str, args)], check=True)


def synthetic_root(settings: Settings) -> Path:
    """A challenge tree of `e2e_images` training and `predict_images` test images, written once per cache."""
    from siim_jax.data import layout

    root = Path(settings.cache) / f"synthetic-{settings.e2e_images}-{settings.predict_images}"
    if not (root / layout.TRAIN_CSV).is_file():  # written last: its absence means an unfinished folder
        shutil.rmtree(root, ignore_errors=True)
        siim_jax_command("synth", root, "--n-train", settings.e2e_images, "--n-test", settings.predict_images,
                         "--processes", settings.workers)  # fmt: skip
    return root


def prepared_dir(settings: Settings, size: int) -> Path:
    """The TFDS cache of the synthetic training images at `size`, prepared once per cache."""
    from siim_jax.data import tfds_siim

    prepared = Path(settings.cache) / f"prepared-{settings.e2e_images}"
    if not (tfds_siim.prepared_path(prepared, size) / "dataset_info.json").is_file():  # TFDS writes it last
        siim_jax_command("prepare", synthetic_root(settings), "--size", size, "--out", prepared,
                         "--workers", settings.workers)  # fmt: skip
    return prepared


def model_dir(settings: Settings, model: str) -> Path:
    return Path(settings.cache) / f"model-{model}"


def bench_model_config(model: str):
    """The UNet of `model` in bfloat16 compute, without the classification head (smp.Unet has none)."""
    from siim_jax.configs.defaults import default_model_config

    config = default_model_config()
    config.update({"encoder": model, "dtype": "bfloat16", "cls_head": False})
    return config


def bench_config(model: str, batch: int):
    """The project's whole config (model, optim, train, ...) of the benchmark's step: `bench_model_config`,
    Adam as the recipes' default, `batch` images per step. The variants override its keys."""
    from siim_jax.configs import defaults

    config = defaults.default_config()
    config.model = bench_model_config(model)
    config.train.batch_size = batch
    return config


def write_model_dir(settings: Settings, model: str) -> Path:
    """A randomly initialised model directory, as `siim-jax convert` writes one, for `predict --checkpoint`."""
    from siim_jax.models import io as model_io
    from siim_jax.training.loop import init_model

    config = bench_model_config(model)
    path = model_dir(settings, model)
    shutil.rmtree(path, ignore_errors=True)
    model_io.save_model(path, init_model(config, seed=0), config)
    return path


def seconds_to(make) -> float:
    start = time.perf_counter()
    make()
    return time.perf_counter() - start


def run_data(job: Job, settings: Settings, report) -> dict:
    """Makes every input of the later parts (on the CPU: the runner hides the GPU from this part)."""
    return {
        "synth_s": seconds_to(lambda: synthetic_root(settings)),
        "prepare_s": seconds_to(lambda: prepared_dir(settings, job.size)),
        "model_s": seconds_to(lambda: write_model_dir(settings, job.model)),
        "train_images": settings.e2e_images,
        "test_images": settings.predict_images,
    }
