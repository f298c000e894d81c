"""The wheel is complete: built from a copy of the sources and installed in a fresh virtual environment, its
`siim-jax demo` runs from another folder, on the configs shipped inside the package, and every siim_jax module it
loads comes from that environment.

The fresh environment reaches the dependencies through a .pth line naming the test interpreter's site-packages: a
path line adds the folder without running the .pth files inside it, so the editable install of the checkout (whose
finder would serve any module the wheel lacks) stays out.
"""

import json
import shutil
import site
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
    for package in ("siim_jax", "configs"):  # configs/ ships as siim_jax.configs (pyproject's package-dir)
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run([*pip_wheel, str(source)], check=True, timeout=300)
    (wheel,) = out.glob("siim_jax-*.whl")
    return wheel


# Runs a console script like its own launcher would, then lists where each siim_jax module was loaded from.
LAUNCHER = """
import atexit, json, runpy, sys
out, script = sys.argv[1], sys.argv[2]
def loaded():
    files = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}
    with open(out, "w") as file:
        json.dump({name: path for name, path in files.items() if name.split(".")[0] == "siim_jax"}, file)
atexit.register(loaded)
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def fresh_environment(folder: Path) -> tuple[Path, Path]:
    """A virtual environment without siim_jax that sees the test interpreter's packages; (python, site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    where = [str(python), "-I", "-c", "import site; print(site.getsitepackages()[0])"]
    packages = Path(subprocess.run(where, check=True, capture_output=True, text=True).stdout.strip())
    (packages / "dependencies.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    return python, packages


def test_installed_wheel_runs_the_demo_from_another_folder(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    assert {f"siim_jax/configs/{name}.py" for name in (*RECIPES, "defaults")} <= set(zipfile.ZipFile(wheel).namelist())

    python, packages = fresh_environment(tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    isolated = [str(python), "-I"]  # no PYTHONPATH, user site or script folder: the checkout is out of reach
    absent = subprocess.run([*isolated, "-c", "import siim_jax"], cwd=elsewhere, capture_output=True, text=True)
    assert "No module named 'siim_jax'" in absent.stderr  # before the install, no copy is reachable
    pip_install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    subprocess.run([*pip_install, str(wheel)], check=True, timeout=300)

    (tmp_path / "launcher.py").write_text(LAUNCHER)
    modules = tmp_path / "modules.json"
    command = [*isolated, str(tmp_path / "launcher.py"), str(modules), str(python.parent / "siim-jax")]
    demo = subprocess.run([*command, "demo", "--workdir", "run", *TINY], cwd=elsewhere, capture_output=True,
                          text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert 0.0 <= summary["dice"] <= 1.0
    assert Path(summary["outputs"]["submission"]).is_file()
    loaded = json.loads(modules.read_text())
    assert {"siim_jax.cli", "siim_jax.commands.demo", "siim_jax.data.synthetic"} <= set(loaded)
    outside = {name: path for name, path in loaded.items() if not (path and Path(path).is_relative_to(packages))}
    assert not outside, f"siim_jax modules loaded from outside the installed wheel: {outside}"
