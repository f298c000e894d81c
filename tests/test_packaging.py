"""The wheel is complete: built from a copy of the sources and installed outside the checkout, its `siim-jax demo`
runs from another folder, on the configs shipped inside the package."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("demo", "unet_resnet50", "unet_seresnext50", "unet_winner")
# tests/test_demo.py's tiny demo, at 64² with a narrow decoder
TINY = ["--n-train", "60", "--n-test", "3", "--config.train.batch_size=8", "--config.train.epochs=1",
        "--config.train.eval_at_start=False", "--config.data.image_size=64",
        "--config.model.decoder_channels=(16,8,8,8,8)"]


def build_wheel(out: Path) -> Path:
    """A wheel of a copy of the sources (the build writes build/ and egg-info next to them, not in the checkout)."""
    source = out / "source"
    shutil.copytree(ROOT / "siim_jax", source / "siim_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run([*pip_wheel, str(source)], check=True, timeout=300)
    (wheel,) = out.glob("siim_jax-*.whl")
    return wheel


def test_installed_wheel_runs_the_demo_from_another_folder(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    assert {f"siim_jax/configs/{name}.py" for name in (*RECIPES, "defaults")} <= set(zipfile.ZipFile(wheel).namelist())

    site = tmp_path / "site"
    pip_install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site)]
    subprocess.run([*pip_install, str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy only, not the checkout

    where = [sys.executable, "-c", "import siim_jax; print(siim_jax.__file__)"]
    located = subprocess.run(where, cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert Path(located.stdout.strip()).is_relative_to(site)

    demo = subprocess.run([str(site / "bin" / "siim-jax"), "demo", "--workdir", "run", *TINY], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert 0.0 <= summary["dice"] <= 1.0
    assert Path(summary["outputs"]["submission"]).is_file()
