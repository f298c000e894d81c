"""Assembling and reporting: every figure as one JSON-ready dict, the goals, the table and the notes."""

from __future__ import annotations

import dataclasses

from train_bench.plan import STAGE2_IMAGES, Job, Settings

GOAL_RATIO_TO_COMPILE = {"resnet50": 2.0, "se_resnext50_32x4d": 1.5}  # issue 14, at 512²
GOAL_E2E_FRACTION, GOAL_STAGE2_S = 0.9, 60.0
# Datasheet dense bf16 matrix peaks, TFLOP/s, matched in order against jax's device_kind.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
MEASURED_H100_TFLOPS = 790.0  # the H100's measured bf16 matrix rate (shared/device/README.md)


def progress_summary(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')} {result.get('note') or result.get('error', '')[-300:]}".strip()
    parts = {"e2e": result.get("e2e"), "eager": result.get("eager"), "compile": result.get("compile")}
    if "images_per_s" in result:
        parts = {"step": result, **parts}
    rates = [f"{name} {cell(part, 'images_per_s', '.1f')}" for name, part in parts.items() if part]
    if rates:
        return f"ok, {', '.join(rates)} img/s"
    return f"ok, {result['device_kind']}" if "device_kind" in result else "ok"


def peak_tflops(device_kind: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_kind), None)


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    values = [(part or {}).get("images_per_s") for part in (numerator, denominator)]
    return values[0] / values[1] if all(values) else None


def assemble(done: list[tuple[Job, dict]], probe: dict, settings: Settings, notes: list[str]) -> dict:
    """Every figure as one JSON-ready dict: device, per-case jax / torch parts with ratios, e2e, predict."""
    cases, data, e2e, predict = {}, None, None, None
    peak = peak_tflops(probe.get("device_kind", ""))
    for job, result in done:
        if job.kind == "data":
            data = result
            continue
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
        "data": data,
        "cases": list(cases.values()),
        "e2e": e2e,
        "predict": predict,
        "goals": goals(list(cases.values()), e2e, predict, judged=not settings.smoke),  # CPU figures prove nothing
        "notes": notes,
    }


def goals(cases: list[dict], e2e: dict | None, predict: dict | None, judged: bool) -> list[dict]:
    """The issue's goals that apply to this run: each with its figure (None where its part did not run to the
    end), its bound and whether it is met (None where not measured, or for every goal when not `judged`)."""
    applicable = [
        (f"{case['model']} {case['size']}²x{case['batch']} jax / torch.compile", case["ratio_to_torch_compile"],
         ">=", GOAL_RATIO_TO_COMPILE[case["model"]])
        for case in cases
        if case["model"] in GOAL_RATIO_TO_COMPILE and case["size"] == 512
        and case.get("torch_compile", {}).get("status") != "not run"
    ]  # fmt: skip
    if e2e:
        applicable.append(("e2e / pure step", e2e.get("ratio_to_pure"), ">=", GOAL_E2E_FRACTION))
    if predict:
        name = f"stage-2 prediction s ({STAGE2_IMAGES} images at {predict['size']}², hflip TTA, DICOM to CSV)"
        applicable.append((name, predict.get("stage2_projected_s"), "<=", GOAL_STAGE2_S))
    return [
        {"goal": name, "value": value, "bound": f"{sense} {bound}",
         "met": None if value is None or not judged else (value >= bound if sense == ">=" else value <= bound)}
        for name, value, sense, bound in applicable
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
            f"{predict['stage2_projected_s']:.1f} s with a warm compilation cache (goal <= 60 s; start "
            f"{predict['startup_s']:.1f} s, per call {predict['fixed_s'] - predict['startup_s']:.1f} s), "
            f"compile {predict['compile_s']:.0f} s",
        ))  # fmt: skip
    unjudged = "not judged on a CPU" if summary["mode"] == "smoke" else "not measured"
    verdicts = {True: "met", False: "NOT met", None: unjudged}
    lines.extend(
        f"goal: {goal['goal']} = {number(goal['value'], '.3g')} ({goal['bound']}): {verdicts[goal['met']]}"
        for goal in summary["goals"]
    )
    lines.extend(f"note: {note}" for note in summary["notes"])
    return "\n".join(lines)


def problems(summary: dict) -> list[str]:
    """Every part that did not run to the end, with its reason."""
    parts = [(f"{c['model']} {c['size']}²x{c['batch']} {name}", c.get(name)) for c in summary["cases"]
             for name in ("jax", "torch_eager", "torch_compile")]  # fmt: skip
    parts += [("data", summary["data"]), ("e2e", summary["e2e"]), ("predict", summary["predict"])]
    return [
        f"{name}: {part['status']} {part.get('note') or part.get('error', '')[:300]}".strip()
        for name, part in parts
        if part and part.get("status", "ok") not in ("ok", "not run")
    ]
