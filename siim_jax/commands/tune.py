"""`siim-jax tune`: grid search of the post-processing, for `predict --postprocess` (siim_jax.evaluation.tune).

    siim-jax tune --checkpoint DIR --fold K [--out postprocess.json]
    siim-jax tune --oof CV_WORKDIR [--oof CV_WORKDIR ...] [--out postprocess.json]

With `--oof` it tunes on the out-of-fold predictions of `siim-jax cv` runs without predicting; with several
`--checkpoint`s or `--ensemble`, on the ensemble's predictions. Prints the best settings and writes the best one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from siim_jax.commands.arguments import (
    add_labelled_data_arguments,
    add_model_arguments,
    inference_from_args,
    labelled_data_from_args,
)
from siim_jax.evaluation.evaluate import labelled_frame
from siim_jax.evaluation.oof import FoldPredictions, pooled_oof
from siim_jax.evaluation.tune import format_table, predict_fold, tune


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_labelled_data_arguments(parser, "validation fold to tune on (default: the training config's data.fold)")
    parser.add_argument("--out", type=Path, default=Path("postprocess.json"), help="JSON to write (postprocess.json)")
    parser.add_argument("--grid", type=Path, metavar="JSON",
                        help="search grid: {field: [values]} or a list of them (default: postprocess.default_grid)")
    parser.add_argument("--top", type=int, default=10, help="rows of the table printed (10)")
    parser.add_argument("--oof", action="append", type=Path, metavar="CV_WORKDIR",
                        help="tune on the out-of-fold predictions of a `siim-jax cv` run, all folds pooled, instead "
                             "of predicting; repeated: on the mean of several runs' (an ensemble's)")


def run(args: argparse.Namespace) -> int:
    grid = json.loads(args.grid.read_text()) if args.grid else None
    if args.oof:
        fold, source = pooled_oof(args.oof), "out of fold"
    else:
        fold, source = _predict_validation_fold(args)
    results = tune(fold, grid)
    height, width = fold.original_resolution
    print(f"{source}: {len(fold.probs)} images at {fold.resolution[0]}x{fold.resolution[1]}, "
          f"{len(results)} settings; areas in pixels at {height}x{width}")
    print(format_table(results, args.top))
    best, dice = results[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    best.to_json(args.out)
    print(f"wrote the best setting (Dice {dice:.4f}) to {args.out}")
    return 0


def _predict_validation_fold(args: argparse.Namespace) -> tuple[FoldPredictions, str]:
    inference = inference_from_args(args)
    dicom_dir, labels, data_config = labelled_data_from_args(args, inference.config)
    fold_index = args.fold if args.fold is not None else (int(data_config.fold) if data_config is not None else None)
    if fold_index is None:
        raise SystemExit("the checkpoint's config names no validation fold: pass --fold")
    frame = labelled_frame(dicom_dir, labels, fold_index, data_config)
    return predict_fold(inference, frame), f"fold {fold_index}"
