"""tools/bench_train.py in its CPU smoke mode: every part runs and the last line is the JSON of every figure.

No timing is asserted: the budget and the timeout are wide, so that only a hang fails the test (the run takes about
75 CPU-seconds, a few minutes on a busy shared machine). What is asserted is the JSON's layout (the keys that
tools/train_bench/report.py and measure.py document) and its arithmetic: every figure finite and positive, every
ratio the quotient of the two figures it names.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import reference_import

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_train.py"
STAGE2_IMAGES = 3205  # tools/train_bench/plan.py
ROUND_OFF = 1e-12  # a ratio recomputed from the JSON's floats (which round-trip exactly) in the same few operations

SUMMARY_KEYS = {"mode", "device", "settings", "cases", "e2e", "predict", "goals", "notes", "elapsed_s"}
CASE_KEYS = {"model", "size", "batch", "jax", "torch_eager", "torch_compile", "ratio_to_torch_eager"}
CASE_KEYS |= {"ratio_to_torch_compile"}
JAX_KEYS = {"status", "platform", "device_kind", "device_count", "images_per_s", "step_ms", "compile_s", "loss"}
JAX_KEYS |= {"flops_per_step", "flops_per_step_optimised", "gflop_per_image", "achieved_tflops", "peak_gb"}
JAX_KEYS |= {"xla_step_memory_gb"}
E2E_KEYS = {"model", "size", "batch", "status", "images_per_s", "ratio_to_pure", "workers", "warmup_steps", "steps"}
E2E_KEYS |= {"distinct_images", "first_batch_s", "prepare_s"}
PREDICT_KEYS = {"model", "size", "batch", "tta_hflip", "status", "images_per_s", "stage2_projected_s", "compile_s"}
PREDICT_KEYS |= {"peak_gb", "platform", "device_kind", "device_count"}
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
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--budget-s", "1500", "--out", str(out)]
    command += ["--cache", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=SCRIPT.parents[1])
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text())
    return summary, completed.stdout


def test_smoke_run_measures_every_jax_part(smoke):
    summary, stdout = smoke
    assert summary.keys() == SUMMARY_KEYS
    assert summary["mode"] == "smoke" and summary["goals"] == []  # CPU figures judge no goal
    assert summary["settings"]["smoke"] and summary["settings"]["steps"] == 2
    assert_positive(summary, "elapsed_s")
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
    assert_positive(e2e, "images_per_s", "ratio_to_pure", "first_batch_s", "prepare_s")
    assert_quotient(e2e["ratio_to_pure"], e2e["images_per_s"], jax_part["images_per_s"])

    predict = summary["predict"]
    assert predict.keys() == PREDICT_KEYS and predict["status"] == "ok", predict
    assert_positive(predict, "images_per_s", "stage2_projected_s", "compile_s")
    assert_quotient(predict["stage2_projected_s"], STAGE2_IMAGES, predict["images_per_s"])
    assert any("jax img/s" in line and "x compile" in line for line in stdout.splitlines())  # the table


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
