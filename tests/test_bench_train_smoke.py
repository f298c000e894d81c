"""tools/bench_train.py in its CPU smoke mode: every part runs and the last line is the JSON of every figure.

No timing is asserted: the budget and the timeout are wide, so that only a hang fails the test (the run takes about
75 CPU-seconds, a few minutes on a busy shared machine).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_train.py"
HAS_TORCH_PEER = all(importlib.util.find_spec(name) for name in ("torch", "segmentation_models_pytorch"))


def positive_rate(part: dict) -> bool:
    rate = part.get("images_per_s")
    return part.get("status") == "ok" and rate is not None and math.isfinite(rate) and rate > 0


def test_smoke_run_measures_every_part(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--budget-s", "1500", "--out", str(out)]
    command += ["--cache", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=SCRIPT.parents[1])
    assert completed.returncode == 0, completed.stderr[-3000:]

    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text())
    assert summary["mode"] == "smoke"
    assert {"device", "settings", "cases", "e2e", "predict", "goals", "notes", "elapsed_s"} <= summary.keys()
    (case,) = summary["cases"]
    assert (case["model"], case["size"], case["batch"]) == ("resnet18", 64, 2)
    assert positive_rate(case["jax"]), case["jax"]
    assert case["jax"]["flops_per_step"] > 0 and case["jax"]["compile_s"] > 0
    assert positive_rate(summary["e2e"]), summary["e2e"]
    assert positive_rate(summary["predict"]), summary["predict"]
    assert summary["predict"]["stage2_projected_s"] > 0
    if HAS_TORCH_PEER:
        assert positive_rate(case["torch_eager"]), case["torch_eager"]
        assert case["ratio_to_torch_eager"] > 0
    assert any("jax img/s" in line and "x compile" in line for line in completed.stdout.splitlines())  # the table
