"""The main job in one command, on a machine with no data and no network.

    siim-jax demo [--workdir runs/demo] [--config.a.b=value ...]

Writes a synthetic challenge-format dataset, trains the packaged `demo` config on it, tunes the post-processing
on the validation fold, evaluates, predicts the test set into a submission and draws overlays — everything under the
workdir. A second run reuses what is there: the dataset, and the finished (or interrupted) training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from siim_jax import config_utils
from siim_jax.commands.arguments import parse_args_with_config
from siim_jax.data import synthetic
from siim_jax.data.layout import SAMPLE_SUBMISSION_CSV, TEST_DIR, TRAIN_CSV, TRAIN_DIR
from siim_jax.evaluation.evaluate import evaluate_images, format_summary, labelled_frame, summarise
from siim_jax.evaluation.tune import format_table, predict_fold, tune
from siim_jax.inference.overlays import OverlayWriter, overlay_sample
from siim_jax.inference.predictor import Inference
from siim_jax.inference.submission import predict_submission, submission_items

DEMO_CONFIG = "demo"  # configs/demo.py


def ensure_dataset(data_dir: Path, n_train: int, n_test: int, seed: int, mask_source: str | None) -> Path:
    """The synthetic dataset in `data_dir`, generated unless a complete one is there.

    It is written into a sibling folder and renamed when complete, so an interrupted run never leaves a partial
    dataset that a later run would take for a finished one.
    """
    if (data_dir / SAMPLE_SUBMISSION_CSV).is_file():
        print(f"reusing the synthetic dataset in {data_dir}")
        return data_dir
    partial = data_dir.with_name(data_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    summary = synthetic.generate(partial, n_train, n_test, seed=seed, mask_source=mask_source)
    partial.rename(data_dir)
    print(f"wrote {n_train} training and {n_test} test images ({summary.images_per_s:.1f} images/s) to {data_dir}")
    return data_dir


def inference_for(train_dir: Path) -> Inference:
    """The final weights of the training, with predict's default options (hflip TTA on).

    Not `--best`: the best-k ranking scores masks at a bare 0.5 threshold, before the post-processing tuned
    next, which can favour an early model that predicts almost nothing; the cosine schedule's final weights are
    the converged ones.
    """
    return Inference.from_checkpoint(train_dir, batch_size=16)


def run_demo(workdir: Path, n_train: int, n_test: int, seed: int, mask_source: str | None, config=None) -> dict:
    """Runs every stage and returns the summary written to `workdir/summary.json`. `config` defaults to the
    packaged demo config; its `data.root`, when empty, becomes the synthetic dataset."""
    from siim_jax.training.loop import train_and_evaluate  # imports JAX: after the dataset is written

    start = time.perf_counter()
    workdir = workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_dataset(workdir / "data", n_train, n_test, seed, mask_source)

    config = config_utils.load_config(DEMO_CONFIG) if config is None else config_utils.from_dict(config)
    config.data.root = config.data.root or str(data_dir)
    train_dir = workdir / "train"
    print(f"training {config.model.encoder} UNet at {config.data.image_size}² in {train_dir}")
    training = train_and_evaluate(config, train_dir)
    if training["stopped_by"]:
        raise SystemExit(f"training stopped by {training['stopped_by']}; run the demo again to continue")

    inference = inference_for(train_dir)
    frame = labelled_frame(data_dir / TRAIN_DIR, data_dir / TRAIN_CSV, int(config.data.fold), config.data)
    results = tune(predict_fold(inference, frame))
    postprocess = results[0][0]
    postprocess_json = workdir / "postprocess.json"
    postprocess.to_json(postprocess_json)
    print(format_table(results, top=5))

    val_overlays = OverlayWriter(workdir / "overlays" / "val", sample=overlay_sample(len(frame), 16, seed))
    table = evaluate_images(inference, frame, postprocess, val_overlays)
    sheet = val_overlays.finish()
    per_image_csv = workdir / "val_per_image.csv"
    table.to_csv(per_image_csv, index=False)
    metrics = summarise(table)
    print(format_summary(metrics))

    items = submission_items(data_dir / TEST_DIR, data_dir / SAMPLE_SUBMISSION_CSV)
    test_overlays = OverlayWriter(workdir / "overlays" / "test", sample=overlay_sample(len(items), 8, seed))
    submission_csv = workdir / "submission.csv"
    expected = [image_id for image_id, _ in items]
    prediction = predict_submission(inference, items, submission_csv, postprocess, expected, test_overlays)
    print(prediction.report())

    summary = {
        "dice": metrics["dice"],
        "dice_positive": metrics["dice_positive"],
        "auc": metrics["auc"],
        "iou": metrics["iou"],
        "n_val_images": metrics["n_images"],
        "train_steps": training["step"],
        "val_dice_at_0.5": training.get("dice"),
        "predict_images_per_s": prediction.images_per_s,
        "wall_s": time.perf_counter() - start,
        "outputs": {
            "data": str(data_dir),
            "checkpoints": str(train_dir / "checkpoints"),
            "curves": str(train_dir / "curves.png"),
            "metrics": str(train_dir / "metrics.jsonl"),
            "postprocess": str(postprocess_json),
            "val_per_image": str(per_image_csv),
            "contact_sheet": str(sheet) if sheet else None,
            "overlays": str(workdir / "overlays"),
            "submission": str(submission_csv),
        },
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    figures = pd.Series({name: summary[name] for name in ("dice", "dice_positive", "auc", "iou", "wall_s")})
    print("\nvalidation fold (tuned post-processing):")
    print(figures.round(4).to_string())
    print("\noutputs:")
    print("\n".join(f"  {name:14s} {path}" for name, path in summary["outputs"].items() if path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="everything goes here (runs/demo)")
    parser.add_argument("--n-train", type=int, default=400, help="synthetic training images (400)")
    parser.add_argument("--n-test", type=int, default=40, help="synthetic test images (40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset (0)")
    parser.add_argument("--mask-source", help="take the pneumothorax shapes from this label CSV (e.g. a real one)")
    # Parsed by config_flags (arguments.parse_args_with_config); declared here for --help.
    parser.add_argument(
        "--config", metavar="NAME[:ARG]",
        help=f"the recipe ({DEMO_CONFIG}); override its fields with --config.a.b=value",
    )


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    return parse_args_with_config(parser, argv, default=DEMO_CONFIG)


def run(args: argparse.Namespace) -> int:
    run_demo(args.workdir, args.n_train, args.n_test, args.seed, args.mask_source, args.config)
    return 0
