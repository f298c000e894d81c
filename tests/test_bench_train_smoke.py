"""tools/bench_train.py in its CPU smoke mode: every part runs and the last line is the JSON of every figure.

No timing is asserted: the budget and the timeout are wide, so that only a hang fails the test (the run takes about
75 CPU-seconds, a few minutes on a busy shared machine). What is asserted is the JSON's layout (the keys that
tools/train_bench/report.py, measure.py and prediction.py document), its arithmetic (every figure finite and
positive, every ratio the quotient of the two figures it names, the stage-2 projection the line through its two
measured calls), the goals it reports, and the one archive of logs that a remote run brings back.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from .conftest import reference_import

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_train.py"
STAGE2_IMAGES = 3205  # tools/train_bench/plan.py
ROUND_OFF = 1e-12  # a ratio recomputed from the JSON's floats (which round-trip exactly) in the same few operations

SUMMARY_KEYS = {"mode", "device", "settings", "data", "cases", "e2e", "predict", "goals", "notes", "logs", "elapsed_s"}
DATA_KEYS = {"status", "synth_s", "prepare_s", "model_s", "train_images", "test_images"}
CASE_KEYS = {"model", "size", "batch", "jax", "torch_eager", "torch_compile", "ratio_to_torch_eager"}
CASE_KEYS |= {"ratio_to_torch_compile"}
JAX_KEYS = {"status", "platform", "device_kind", "device_count", "images_per_s", "step_ms", "compile_s", "loss"}
JAX_KEYS |= {"flops_per_step", "flops_per_step_optimised", "gflop_per_image", "achieved_tflops", "peak_gb"}
JAX_KEYS |= {"xla_step_memory_gb"}
E2E_KEYS = {"model", "size", "batch", "status", "images_per_s", "ratio_to_pure", "workers", "warmup_steps", "steps"}
E2E_KEYS |= {"train_images", "first_batch_s"}
PREDICT_KEYS = {"model", "size", "batch", "tta_hflip", "status", "images_per_s", "stage2_projected_s", "compile_s"}
PREDICT_KEYS |= {"peak_gb", "platform", "device_kind", "device_count", "seconds_per_image", "fixed_s", "startup_s"}
PREDICT_KEYS |= {"import_s", "small_images", "small_s", "large_images", "large_s", "workers"}
GOAL_KEYS = {"goal", "value", "bound", "met"}
TORCH_KEYS = {"status", "images_per_s", "step_ms", "first_step_s", "peak_gb", "precision", "loss"}


def assert_positive(part: dict, *keys: str) -> None:
    for key in keys:
        value = part[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value)


def assert_quotient(value: float, numerator: float, denominator: float) -> None:
    assert value == pytest.approx(numerator / denominator, rel=ROUND_OFF)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    """(the JSON summary, stdout) of one smoke run, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("bench")
    out = tmp_path / "out" / "bench.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--budget-s", "1500", "--out", str(out)]
    command += ["--cache", str(tmp_path / "cache")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=SCRIPT.parents[1])
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text())
    assert summary["logs"] == str(out.with_name("bench_logs.tar.gz"))
    return summary, completed.stdout


def test_smoke_run_measures_every_jax_part(smoke):
    summary, stdout = smoke
    assert summary.keys() == SUMMARY_KEYS
    assert summary["mode"] == "smoke" and all(goal["met"] is None for goal in summary["goals"])  # CPU: no verdict
    assert summary["settings"]["smoke"] and summary["settings"]["steps"] == 2
    assert_positive(summary, "elapsed_s")
    data = summary["data"]
    assert data.keys() == DATA_KEYS and data["status"] == "ok", data
    assert_positive(data, "synth_s", "prepare_s", "model_s")
    (case,) = summary["cases"]
    assert case.keys() == CASE_KEYS
    assert (case["model"], case["size"], case["batch"]) == ("resnet18", 64, 2)
    assert case["torch_compile"] == {"status": "not run"} and case["ratio_to_torch_compile"] is None  # GPU only

    jax_part = case["jax"]
    assert jax_part.keys() >= JAX_KEYS and jax_part["status"] == "ok", jax_part
    assert_positive(jax_part, "images_per_s", "step_ms", "compile_s", "flops_per_step", "gflop_per_image")
    assert_positive(jax_part, "achieved_tflops", "loss")
    assert_quotient(jax_part["step_ms"], 1e3 * case["batch"], jax_part["images_per_s"])
    assert_quotient(jax_part["gflop_per_image"], jax_part["flops_per_step"] / 1e9, case["batch"])
    flops_per_s = jax_part["flops_per_step"] * jax_part["images_per_s"]
    assert_quotient(jax_part["achieved_tflops"], flops_per_s / 1e12, case["batch"])

    e2e = summary["e2e"]
    assert e2e.keys() == E2E_KEYS and e2e["status"] == "ok", e2e
    assert (e2e["model"], e2e["size"], e2e["batch"]) == ("resnet18", 64, 2)
    assert_positive(e2e, "images_per_s", "ratio_to_pure", "first_batch_s")
    assert_quotient(e2e["ratio_to_pure"], e2e["images_per_s"], jax_part["images_per_s"])
    assert 0 < e2e["train_images"] < data["train_images"]  # less the validation fold
    assert any("jax img/s" in line and "x compile" in line for line in stdout.splitlines())  # the table


def test_smoke_run_projects_stage2_prediction(smoke):
    summary, _ = smoke
    predict = summary["predict"]
    assert predict.keys() == PREDICT_KEYS and predict["status"] == "ok", predict
    assert (predict["model"], predict["size"], predict["tta_hflip"]) == ("resnet18", 64, True)
    assert_positive(predict, "images_per_s", "seconds_per_image", "stage2_projected_s", "startup_s", "import_s")
    assert_positive(predict, "small_s", "large_s")
    assert predict["startup_s"] > predict["import_s"]  # imports, then the model restore
    assert predict["large_images"] == summary["data"]["test_images"] > predict["small_images"] > 0
    assert_quotient(predict["seconds_per_image"], 1.0, predict["images_per_s"])
    # The projection is the line through the two warm calls (or, where timing noise tilts it down, the large
    # call's seconds per image), started after the imports and the model restore.
    per_image = predict["seconds_per_image"]
    slope = (predict["large_s"] - predict["small_s"]) / (predict["large_images"] - predict["small_images"])
    assert per_image == pytest.approx(slope if slope > 0 else predict["large_s"] / predict["large_images"])
    fixed = predict["startup_s"] + predict["small_s"] - per_image * predict["small_images"]
    assert predict["fixed_s"] == pytest.approx(fixed)
    assert predict["stage2_projected_s"] == pytest.approx(predict["fixed_s"] + STAGE2_IMAGES * per_image)


def test_smoke_run_reports_the_goals_it_applies(smoke):
    summary, stdout = smoke
    e2e_goal, stage2_goal = summary["goals"]  # the ratio goals name UNet-ResNet50/SE-ResNeXt50, not the smoke model
    assert e2e_goal.keys() == stage2_goal.keys() == GOAL_KEYS
    assert (e2e_goal["value"], e2e_goal["bound"]) == (summary["e2e"]["ratio_to_pure"], ">= 0.9")
    assert (stage2_goal["value"], stage2_goal["bound"]) == (summary["predict"]["stage2_projected_s"], "<= 60.0")
    assert sum("not judged on a CPU" in line for line in stdout.splitlines()) == 2


def test_smoke_run_packs_every_log_into_one_archive(smoke, tmp_path):
    summary, stdout = smoke
    archive = Path(summary["logs"])
    assert sorted(path.name for path in archive.parent.iterdir()) == ["bench.json", "bench_logs.tar.gz"]
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    assert all(re.fullmatch(r"[A-Za-z0-9_./-]+", name) for name in names), names  # no '+', no '²'
    logs = tmp_path / "bench_logs"
    parts = ["probe", "data", "jax-e2e", "torch", "predict"]
    for part in parts:
        (log,) = [path for path in logs.glob("*.log") if re.fullmatch(rf"(\d\d-)?{part}(_\S+)?\.log", path.name)]
        assert json.loads(log.with_suffix(".json").read_text())["status"] == "ok", log
    assert json.loads((logs / "summary.json").read_text()) == summary
    assert (logs / "summary.txt").read_text() in stdout


def test_smoke_run_measures_the_torch_reference(smoke):
    reference_import("torch")
    reference_import("segmentation_models_pytorch")
    summary, _ = smoke
    (case,) = summary["cases"]
    eager = case["torch_eager"]
    assert eager.keys() == TORCH_KEYS and eager["status"] == "ok", eager
    assert_positive(eager, "images_per_s", "step_ms", "first_step_s", "loss")
    assert_quotient(eager["step_ms"], 1e3 * case["batch"], eager["images_per_s"])
    assert_quotient(case["ratio_to_torch_eager"], case["jax"]["images_per_s"], eager["images_per_s"])


def test_a_part_past_the_budget_is_stopped_and_the_rest_skipped(tmp_path):
    """With a budget that ends during a part (the data part, on most machines), that part is stopped, every later
    part is listed as skipped, and the run still ends at once with its JSON and its archive."""
    budget_s = 20
    out = tmp_path / "out" / "bench.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--budget-s", str(budget_s), "--out", str(out)]
    command += ["--cache", str(tmp_path / "cache")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1])
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["elapsed_s"] < budget_s + 30  # the stop, the report and the archive take seconds
    (case,) = summary["cases"]
    parts = {"data": summary["data"], "jax": case["jax"], "torch": case["torch_eager"], "predict": summary["predict"]}
    statuses = [part["status"] for part in parts.values()]  # in the order they run
    stopped = statuses.index("timeout")
    assert statuses == ["ok"] * stopped + ["timeout"] + ["skipped"] * (len(statuses) - stopped - 1), statuses
    assert any(": timeout stopped after" in note for note in summary["notes"])
    with tarfile.open(summary["logs"]) as tar:
        assert "bench_logs/summary.json" in tar.getnames()
