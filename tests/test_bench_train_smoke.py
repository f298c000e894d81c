"""tools/bench_train.py in its CPU smoke mode: every part runs and the last line is the JSON of every figure.

No timing is asserted: the budget and the timeout are wide, so that only a hang fails the test (the run takes about
75 CPU-seconds, a few minutes on a busy shared machine). What is asserted is the JSON's layout (the keys that
tools/train_bench/report.py, measure.py and prediction.py document), its arithmetic (every figure finite and
positive, every ratio the quotient of the two figures it names, the stage-2 projection the line through its two
measured calls), the goals it reports, and the one archive of logs that a remote run brings back.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from .conftest import reference_import

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_train.py"
# The smoke and variants runs below take minutes each: the module's tests share one xdist worker, which builds
# them once.
pytestmark = pytest.mark.xdist_group("bench_smoke")
STAGE2_IMAGES = 3205  # tools/train_bench/plan.py
ROUND_OFF = 1e-12  # a ratio recomputed from the JSON's floats (which round-trip exactly) in the same few operations

SUMMARY_KEYS = {"mode", "device", "settings", "data", "cases", "e2e", "predict", "profile", "goals", "notes", "logs"}
SUMMARY_KEYS |= {"elapsed_s"}
DATA_KEYS = {"status", "synth_s", "prepare_s", "model_s", "train_images", "test_images"}
CASE_KEYS = {"model", "size", "batch", "status", "work", "peak_gb", "torch_eager", "torch_compile", "variants"}
CASE_KEYS |= {"ratio_to_torch_eager", "ratio_to_torch_compile"}
SPREAD_KEYS = {"images_per_s", "min_images_per_s", "max_images_per_s", "iqr_images_per_s", "rounds"}
VARIANT_KEYS = {"status", "overrides", "batch", "compile_s", "flops_per_image", "xla_step_memory_gb", "loss"}
VARIANT_KEYS |= SPREAD_KEYS | {"ratio_to_torch_eager", "ratio_to_torch_compile", "achieved_tflops", "fraction_of_peak"}
WORK_KEYS = {"loss", "jax_params", "jax_model_input", "jax_flops_per_image", "torch_params", "torch_model_input"}
WORK_KEYS |= {"torch_flops_per_image", "torch_flops_per_image_uncorrected"}
E2E_KEYS = {"model", "size", "batch", "status", "input_images_per_s", "data_wait_fraction", "ratio_to_pure"}
E2E_KEYS |= {"workers", "warmup_steps", "steps", "train_images", "first_batch_s", "compile_s", "loss"}
PREDICT_KEYS = {"model", "size", "batch", "tta_hflip", "status", "images_per_s", "stage2_projected_s", "compile_s"}
PREDICT_KEYS |= {"peak_gb", "platform", "device_kind", "device_count", "seconds_per_image", "fixed_s", "startup_s"}
PREDICT_KEYS |= {"import_s", "small_images", "small_s", "large_images", "large_s", "workers"}
GOAL_KEYS = {"goal", "value", "bound", "met"}
TORCH_KEYS = {"status", "first_step_s", "peak_gb", "precision", "loss"} | SPREAD_KEYS
ROUNDS = 3  # tools/bench_train.py --rounds default
FLOP_TOLERANCE = 0.02  # the benchmark's promise; the counts are in fact of the same products (test_bench_flops.py)


def assert_positive(part: dict, *keys: str) -> None:
    for key in keys:
        value = part[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value)


def assert_quotient(value: float, numerator: float, denominator: float) -> None:
    assert value == pytest.approx(numerator / denominator, rel=ROUND_OFF)


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    """One cache folder (data, compilation cache) for the runs below: later runs load the step compiled first."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, bench_cache) -> tuple[dict, str]:
    """(the JSON summary, stdout) of one smoke run, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("bench")
    out = tmp_path / "out" / "bench.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--budget-s", "1500", "--out", str(out)]
    command += ["--cache", str(bench_cache)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=SCRIPT.parents[1])
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text())
    assert summary["logs"] == str(out.with_name("bench_logs.tar.gz"))
    return summary, completed.stdout


def assert_rounds(part: dict) -> None:
    """ROUNDS alternating rounds, summarised by their median, extremes and interquartile range."""
    rates = part["rounds"]
    assert len(rates) == ROUNDS and all(rate > 0 for rate in rates), rates
    assert part["images_per_s"] == statistics.median(rates)
    assert (part["min_images_per_s"], part["max_images_per_s"]) == (min(rates), max(rates))
    assert 0 <= part["iqr_images_per_s"] <= max(rates) - min(rates)


def assert_same_work(case: dict) -> None:
    """Both sides train the same network (parameter counts equal), on the same batch shape with the same loss,
    and the jaxpr's FLOP count agrees with PyTorch's counter (its grouped-convolution formula corrected)."""
    work = case["work"]
    assert work.keys() == WORK_KEYS
    assert work["jax_params"] == work["torch_params"] > 0
    n, h, w, c = work["jax_model_input"]  # NHWC
    assert work["torch_model_input"] == [n, c, h, w] == [case["batch"], 3, case["size"], case["size"]]
    assert work["jax_flops_per_image"] == pytest.approx(work["torch_flops_per_image"], rel=FLOP_TOLERANCE)
    assert work["loss"].startswith("BCE with logits + per-image soft Dice")


def test_smoke_run_measures_every_jax_part(smoke):
    summary, stdout = smoke
    assert summary.keys() == SUMMARY_KEYS
    assert summary["mode"] == "smoke" and all(goal["met"] is None for goal in summary["goals"])  # CPU: no verdict
    assert summary["settings"]["smoke"] and summary["settings"]["rounds"] == ROUNDS
    assert_positive(summary, "elapsed_s")
    data = summary["data"]
    assert data.keys() == DATA_KEYS and data["status"] == "ok", data
    assert_positive(data, "synth_s", "prepare_s", "model_s")
    (case,) = summary["cases"]
    assert case.keys() == CASE_KEYS and case["status"] == "ok", case
    assert (case["model"], case["size"], case["batch"]) == ("resnet18", 64, 2)
    assert case["torch_compile"] == {"status": "not run"} and case["ratio_to_torch_compile"] is None  # GPU only
    assert_same_work(case)

    jax_part = case["variants"]["baseline"]
    assert jax_part.keys() == VARIANT_KEYS and jax_part["status"] == "ok", jax_part
    assert_positive(jax_part, "compile_s", "flops_per_image", "achieved_tflops", "loss")
    assert_rounds(jax_part)
    assert jax_part["flops_per_image"] == case["work"]["jax_flops_per_image"]
    assert_quotient(jax_part["achieved_tflops"], jax_part["flops_per_image"] * jax_part["images_per_s"], 1e12)
    assert jax_part["fraction_of_peak"] is None  # no peak for a CPU

    e2e = summary["e2e"]
    assert e2e.keys() == E2E_KEYS and e2e["status"] == "ok", e2e
    assert (e2e["model"], e2e["size"], e2e["batch"]) == ("resnet18", 64, 2)
    assert_positive(e2e, "input_images_per_s", "ratio_to_pure", "first_batch_s")
    assert 0 <= e2e["data_wait_fraction"] < 1
    assert e2e["steps"] == 10  # e2e_steps 2, rounded up to one window of 10
    assert_quotient(e2e["ratio_to_pure"], e2e["input_images_per_s"], jax_part["images_per_s"])
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
    parts = ["probe", "data", "duel-eager", "e2e", "predict"]
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
    assert_positive(eager, "first_step_s", "loss")
    assert_rounds(eager)
    assert_quotient(case["ratio_to_torch_eager"], case["variants"]["baseline"]["images_per_s"], eager["images_per_s"])


def test_a_part_past_the_budget_is_stopped_and_the_rest_skipped(tmp_path):
    """A part still running at the budget's end is stopped, every later part is listed as skipped, and the run
    still ends at once with its JSON and its archive. The data part is made to hang (a sitecustomize on the
    children's path sleeps in it), so the stop does not depend on how fast this machine is: on a fast one an
    honest data part finished within the budget and nothing was stopped."""
    hang = tmp_path / "hang"
    hang.mkdir()
    (hang / "sitecustomize.py").write_text(
        "import sys, time\n"
        "if '--one' in sys.argv and '\"kind\": \"data\"' in ' '.join(sys.argv):\n"
        "    time.sleep(600)\n"
    )
    budget_s = 20
    out = tmp_path / "out" / "bench.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--budget-s", str(budget_s), "--out", str(out)]
    command += ["--cache", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hang), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1], env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["elapsed_s"] < budget_s + 30  # the stop, the report and the archive take seconds
    (case,) = summary["cases"]
    parts = {"data": summary["data"], "duel": case, "e2e": summary["e2e"], "predict": summary["predict"]}
    statuses = [part["status"] for part in parts.values()]  # in the order they run
    assert statuses == ["timeout", "skipped", "skipped", "skipped"], statuses
    assert any(note.startswith("data: timeout stopped after") for note in summary["notes"]), summary["notes"]
    with tarfile.open(summary["logs"]) as tar:
        assert "bench_logs/summary.json" in tar.getnames()


@pytest.fixture(scope="module")
def variants_run(tmp_path_factory, bench_cache) -> tuple[dict, Path]:
    """(the JSON summary, the extracted logs folder) of one smoke run of three variants with the profile."""
    tmp_path = tmp_path_factory.mktemp("variants")
    out = tmp_path / "out" / "bench.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--variants", "remat,bn_fused,one_norm", "--profile"]
    command += ["--budget-s", "1500", "--out", str(out), "--cache", str(bench_cache)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=SCRIPT.parents[1])
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(out.read_text())
    with tarfile.open(summary["logs"]) as tar:
        tar.extractall(tmp_path, filter="data")
    return summary, tmp_path / "bench_logs"


def test_a_variants_run_times_each_variant_against_torch_in_alternating_rounds(variants_run):
    """The baseline comes first whatever is asked, the others in the table's order; a variants run measures the
    duels only."""
    summary, _ = variants_run
    assert summary["data"] is summary["e2e"] is summary["predict"] is None
    (case,) = summary["cases"]
    assert list(case["variants"]) == ["baseline", "bn_fused", "one_norm", "remat"]  # variants.py's order of gain
    assert_same_work(case)
    eager = case["torch_eager"]
    assert_rounds(eager)
    for name in ("baseline", "bn_fused", "one_norm", "remat"):
        part = case["variants"][name]
        assert part["status"] == "ok", part
        assert_rounds(part)
        assert_quotient(part["ratio_to_torch_eager"], part["images_per_s"], eager["images_per_s"])
    assert case["variants"]["remat"]["overrides"] == {"model.remat": True}
    assert case["variants"]["bn_fused"]["overrides"] == {"model.norm": "fused"}


def test_the_profile_part_writes_a_table_the_hlo_and_the_trace_into_the_archive(variants_run):
    summary, logs = variants_run
    profile = summary["profile"]
    assert profile["status"] == "ok", profile
    table, hlo, trace = (logs / name for name in profile["files"])
    text = table.read_text()
    assert "by kind:" in text and re.search(r"conv/gemm +\d+\.\d %", text), text[:2000]  # convolutions were seen
    assert profile["events"].startswith(("device kernels", "host XLA threads")) and profile["traced_events"] > 0
    with gzip.open(hlo, "rt") as file:
        assert "HloModule" in file.read(1000)
    with gzip.open(trace, "rt") as file:
        assert "traceEvents" in json.load(file)


def test_a_run_killed_mid_part_leaves_the_json_and_archive_of_its_finished_parts(tmp_path):
    """The parent rewrites the JSON and the archive after every part: stopping the run (SIGTERM, as `timeout`
    does) while the second part runs leaves the first part's figures and log on disk, and ends that part too."""
    out = tmp_path / "out" / "bench.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--budget-s", "1500", "--out", str(out)]
    command += ["--cache", str(tmp_path / "cache")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=SCRIPT.parents[1])
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and process.poll() is None:
            summary = json.loads(out.read_text()) if out.is_file() else {}
            if (summary.get("data") or {}).get("status") == "ok":
                break
            time.sleep(1)
        else:
            pytest.fail(f"the data part did not finish in time (exit code {process.poll()})")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    summary = json.loads(out.read_text())
    assert summary["data"]["status"] == "ok"
    with tarfile.open(summary["logs"]) as tar:
        assert any(name.endswith("data_resnet18_64.json") for name in tar.getnames())
    duel = [line for line in os.popen("ps -eo args").read().splitlines() if str(tmp_path / "cache") in line]
    assert not duel, duel  # the part that was running ended with the run
