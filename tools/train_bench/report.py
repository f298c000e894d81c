"""Assembling and reporting: every figure as one JSON-ready dict, the goals, the table and the notes."""

from __future__ import annotations

import dataclasses

from train_bench.plan import STAGE2_IMAGES, Job, Settings
from train_bench.variants import BASELINE

GOAL_RATIO_TO_COMPILE = {"resnet50": 1.5, "se_resnext50_32x4d": 1.5}  # issue 22, at 512²x32
GOAL_E2E_FRACTION, GOAL_STAGE2_S = 0.9, 60.0
# Datasheet dense bf16 matrix peaks (no sparsity), TFLOP/s, matched in order against jax's device_kind.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
NOT_RUN = {"status": "not run"}


def progress_summary(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')} {result.get('note') or result.get('error', '')[-300:]}".strip()
    rates = {f"jax {name}": part for name, part in result.get("variants", {}).items()}
    rates |= {f"torch {mode}": part for mode, part in result.get("torch", {}).items()}
    if "input_images_per_s" in result:
        rates["e2e"] = {"images_per_s": result["input_images_per_s"]}
    if "images_per_s" in result:
        rates["predict"] = result
    shown = [f"{name} {cell(part, 'images_per_s', '.1f')}" for name, part in rates.items()]
    if shown:
        return f"ok, {', '.join(shown)} img/s"
    return f"ok, {result['device_kind']}" if "device_kind" in result else "ok"


def peak_tflops(device_kind: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_kind), None)


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    """The quotient of two parts' median images/s, where both were measured."""
    values = [(part or {}).get("images_per_s") for part in (numerator, denominator)]
    return values[0] / values[1] if all(values) else None


def duel_case(job: Job, result: dict, peak: float | None) -> dict:
    """A duel's figures: per variant its rounds' spread, ratios to torch (from the medians) and the FLOP rate
    of the model's work (the baseline step's count, which PyTorch's counter confirms: `work`)."""
    unfinished = {key: result[key] for key in ("status", "note", "error") if key in result}
    torch = result.get("torch", {})
    case = {
        "model": job.model, "size": job.size, "batch": job.batch, "status": result.get("status"),
        "work": result.get("work"), "peak_gb": result.get("peak_gb"),
        "torch_eager": torch.get("eager", unfinished if "eager" in job.torch_modes else NOT_RUN),
        "torch_compile": torch.get("compile", unfinished if "compile" in job.torch_modes else NOT_RUN),
    }  # fmt: skip
    flops_per_image = (result.get("work") or {}).get("jax_flops_per_image")
    measured = result.get("variants", {})
    case["variants"] = {name: dict(measured.get(name, unfinished)) for name in job.variants}
    for part in case["variants"].values():
        part["ratio_to_torch_eager"] = ratio(part, case["torch_eager"])
        part["ratio_to_torch_compile"] = ratio(part, case["torch_compile"])
        if flops_per_image and part.get("images_per_s"):
            part["achieved_tflops"] = flops_per_image * part["images_per_s"] / 1e12
            part["fraction_of_peak"] = part["achieved_tflops"] / peak if peak else None
    baseline = case["variants"][BASELINE]
    case["ratio_to_torch_eager"] = baseline["ratio_to_torch_eager"]
    case["ratio_to_torch_compile"] = baseline["ratio_to_torch_compile"]
    return case


def assemble(done: list[tuple[Job, dict]], probe: dict, settings: Settings, notes: list[str]) -> dict:
    """Every figure as one JSON-ready dict: device, per-case duels with ratios, e2e, predict, profile."""
    cases, singles = [], {"data": None, "e2e": None, "predict": None, "profile": None}
    peak = peak_tflops(probe.get("device_kind", ""))
    for job, result in done:
        if job.kind == "duel":
            cases.append(duel_case(job, result, peak))
        elif job.kind == "data":
            singles["data"] = result
        else:
            singles[job.kind] = {"model": job.model, "size": job.size, "batch": job.batch, **result}
    e2e = singles["e2e"]
    if e2e:
        pure = next((c["variants"][BASELINE] for c in cases if (c["model"], c["size"], c["batch"]) ==
                     (e2e["model"], e2e["size"], e2e["batch"])), None)  # fmt: skip
        e2e["ratio_to_pure"] = ratio({"images_per_s": e2e.get("input_images_per_s")}, pure)
    if singles["predict"]:
        singles["predict"]["tta_hflip"] = True
    return {
        "mode": "smoke" if settings.smoke else "gpu",
        "device": {**probe, "peak_bf16_tflops": peak},
        "settings": dataclasses.asdict(settings),
        "cases": cases,
        **singles,
        "goals": goals(cases, e2e, singles["predict"], judged=not settings.smoke),  # CPU figures prove nothing
        "notes": notes,
    }


def goals(cases: list[dict], e2e: dict | None, predict: dict | None, judged: bool) -> list[dict]:
    """The issues' goals that apply to this run: each with its figure (None where its part did not run to the
    end), its bound and whether it is met (None where not measured, or for every goal when not `judged`)."""
    applicable = [
        (f"{case['model']} {case['size']}²x{case['batch']} jax / torch.compile (medians)",
         case["ratio_to_torch_compile"], ">=", GOAL_RATIO_TO_COMPILE[case["model"]])
        for case in cases
        if case["model"] in GOAL_RATIO_TO_COMPILE and case["size"] == 512 and case["torch_compile"] != NOT_RUN
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


def spread_cell(part: dict | None) -> str:
    """'median [min-max]' of a part's rounds."""
    if not part or part.get("status", "ok") != "ok" or "images_per_s" not in part:
        return cell(part, "images_per_s", ".1f")
    return f"{part['images_per_s']:.1f} [{part['min_images_per_s']:.0f}-{part['max_images_per_s']:.0f}]"


def table(summary: dict) -> str:
    columns = ("model", "size", "variant", "batch", "jax img/s [min-max]", "eager", "compile", "x eager",
               "x compile", "jax cmp s", "torch cmp s", "GB", "TFLOP/s", "% peak")  # fmt: skip
    rows = [columns]
    for case in summary["cases"]:
        eager, compiled = case["torch_eager"], case["torch_compile"]
        for name, part in case["variants"].items():
            rows.append((
                case["model"], f"{case['size']}²", name, str(part.get("batch", case["batch"])), spread_cell(part),
                spread_cell(eager), spread_cell(compiled),
                number(part.get("ratio_to_torch_eager"), ".2f"), number(part.get("ratio_to_torch_compile"), ".2f"),
                cell(part, "compile_s", ".0f"), cell(compiled, "first_step_s", ".0f"),
                cell(part, "xla_step_memory_gb", ".1f"),
                cell(part, "achieved_tflops", ".3g"), cell(part, "fraction_of_peak", ".0%"),
            ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(value.rjust(width) for value, width in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def part_line(name: str, part: dict, figures) -> str:
    """`name: figures()`, or `name: status` where the part did not run to the end (its reason is in the notes)."""
    return f"{name}: {figures() if part.get('status') == 'ok' else part.get('status')}"


def work_lines(cases: list[dict]) -> list[str]:
    """Per case, the evidence that both sides do the same work: parameters, model input, FLOP per image."""
    lines = []
    for case in cases:
        work = case.get("work")
        if work and "torch_params" in work:
            lines.append(
                f"work {case['model']}: params jax {work['jax_params']:,} torch {work['torch_params']:,}; input jax "
                f"NHWC {work['jax_model_input']} torch NCHW {work['torch_model_input']}; GFLOP/image jax "
                f"{work['jax_flops_per_image'] / 1e9:.2f}, torch counter {work['torch_flops_per_image'] / 1e9:.2f} "
                f"({work['torch_flops_per_image_uncorrected'] / 1e9:.2f} before its grouped-conv correction)"
            )
    return lines


def describe(summary: dict) -> str:
    device = summary["device"]
    versions = device.get("versions", {})
    peak = device.get("peak_bf16_tflops")
    settings = summary["settings"]
    lines = [
        f"{summary['mode']} run on {device.get('device_count', '?')} x {device.get('device_kind', '?')}"
        + (f" (dense bf16 peak {peak:.0f} TFLOP/s)" if peak else "")
        + f"; jax {versions.get('jax')}, flax {versions.get('flax')}, torch {versions.get('torch')}, "
        f"smp {versions.get('segmentation-models-pytorch')}",
        "jax: bf16 compute, f32 params, BCE+Dice, Adam, no class head | torch: smp.Unet, same loss; x = jax / torch "
        f"from medians of {settings['rounds']} alternating rounds of >= {settings['round_s']} s",
        table(summary),
        *work_lines(summary["cases"]),
    ]
    e2e, predict = summary["e2e"], summary["predict"]
    if e2e:
        lines.append(part_line(
            f"e2e ({e2e['model']} {e2e['size']}²x{e2e['batch']}, {settings['workers']} workers)", e2e,
            lambda: f"input {e2e['input_images_per_s']:.1f} img/s = {number(e2e['ratio_to_pure'], '.0%')} of the "
            f"pure step (goal >= 90%), waiting for data {e2e['data_wait_fraction']:.0%} of the time, first batch "
            f"after {e2e['first_batch_s']:.1f} s",
        ))  # fmt: skip
    if predict:
        lines.append(part_line(
            f"predict ({predict['model']}, {predict['size']}², hflip TTA, batch {predict['batch']})", predict,
            lambda: f"{predict['images_per_s']:.1f} img/s, {STAGE2_IMAGES} images in "
            f"{predict['stage2_projected_s']:.1f} s with a warm compilation cache (goal <= 60 s; start "
            f"{predict['startup_s']:.1f} s, per call {predict['fixed_s'] - predict['startup_s']:.1f} s), "
            f"compile {predict['compile_s']:.0f} s",
        ))  # fmt: skip
    if summary["profile"]:
        profile = summary["profile"]
        lines.append(part_line("profile", profile, lambda: f"{profile['events']}: {', '.join(profile['files'])}"))
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
    parts = [(f"{c['model']} {c['size']}²x{c['batch']} {name}", c[name]) for c in summary["cases"]
             for name in ("torch_eager", "torch_compile")]  # fmt: skip
    parts += [(f"{c['model']} {c['size']}² jax {name}", part) for c in summary["cases"]
              for name, part in c["variants"].items()]  # fmt: skip
    parts += [(name, summary[name]) for name in ("data", "e2e", "predict", "profile")]
    return [
        f"{name}: {part['status']} {part.get('note') or part.get('error', '')[:300]}".strip()
        for name, part in parts
        if part and part.get("status", "ok") not in ("ok", "not run")
    ]
