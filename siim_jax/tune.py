"""Grid search of the post-processing on the validation fold, for `predict --postprocess`.

    siim-jax tune --checkpoint DIR --fold K [--out postprocess.json]
    siim-jax tune --oof CV_WORKDIR [--oof CV_WORKDIR ...] [--out postprocess.json]

Predicts the fold's images at the model's resolution, scores every setting of the grid (the default grid of
`postprocess.default_grid`, or `--grid JSON`) by the mean challenge Dice against the label masks resized to
that resolution (nearest, as the training pipeline does), prints the best settings and writes the best one.
Its areas are written at the images' original resolution (1024² for the challenge), where `predict` applies it.
With `--oof` it tunes on the out-of-fold predictions of `siim-jax cv` runs (see siim_jax.cv) without predicting;
with several `--checkpoint`s or `--ensemble`, on the ensemble's predictions (see siim_jax.ensemble).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from siim_jax.data.labels import merged_mask
from siim_jax.evaluate import add_labelled_data_arguments, frame_items, labelled_frame, resolve_labelled_data
from siim_jax.postprocess import PostProcess, default_grid, grid_search
from siim_jax.predict import Inference, add_model_arguments, inference_from_args

TABLE_COLUMNS = ("mode", "threshold", "top_threshold", "min_area", "bottom_threshold", "min_component_area",
                 "class_threshold")
_MODE_FIELDS = {"threshold": {"threshold"}, "triplet": {"top_threshold", "min_area", "bottom_threshold"}}


@dataclasses.dataclass
class FoldPredictions:
    """Probabilities (float16 to halve the memory), truths and class probabilities at the model's resolution."""

    image_ids: list[str]
    probs: list[np.ndarray]
    truths: list[np.ndarray]
    class_probs: list[float] | None
    original_sizes: list[tuple[int, int]]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.probs[0].shape

    @property
    def original_resolution(self) -> tuple[int, int]:
        """The most common original size (all images are 1024² in the challenge)."""
        return collections.Counter(self.original_sizes).most_common(1)[0][0]


def predict_fold(inference: Inference, frame: pd.DataFrame) -> FoldPredictions:
    """Model-resolution predictions and truths of the frame's images, in its order.

    An unreadable image counts as predicted empty, as in `evaluate` and a submission: probabilities and class
    probability 0, against a stand-in truth that is empty exactly when its label is (an empty prediction's Dice
    depends on nothing else), at the fold's most common original size. An `ensemble.Ensemble`'s probabilities,
    averaged at the original size, are resized to its largest member's."""
    fold = FoldPredictions([], [], [], [], [])
    size = inference.image_size
    unreadable = []  # (position, label positive) of each unreadable image, filled in once the fold is read
    for prediction in inference.predictions(frame_items(frame), desc="tune: predict"):
        label_row = frame.iloc[prediction.index]
        fold.image_ids.append(prediction.image_id)
        if prediction.prob is None:
            unreadable.append((len(fold.probs), bool(label_row["positive"])))
            fold.probs.append(None)
            fold.truths.append(None)
            fold.original_sizes.append(None)
            continue
        prob = prediction.prob
        if prob.shape != (size, size):
            prob = cv2.resize(prob, (size, size), interpolation=cv2.INTER_LINEAR)
        height, width = prob.shape
        truth = merged_mask(label_row, prediction.original_size).view(np.uint8)
        fold.probs.append(prob.astype(np.float16))
        fold.truths.append(cv2.resize(truth, (width, height), interpolation=cv2.INTER_NEAREST).astype(bool))
        fold.original_sizes.append(prediction.original_size)
        if prediction.class_prob is not None:
            fold.class_probs.append(prediction.class_prob)
    if len(unreadable) == len(fold.probs):
        raise ValueError("no readable image to tune on")
    original_size = collections.Counter(s for s in fold.original_sizes if s is not None).most_common(1)[0][0]
    for position, positive in unreadable:
        fold.probs[position] = np.zeros((size, size), np.float16)
        fold.truths[position] = np.full((size, size), positive)
        fold.original_sizes[position] = original_size
        if fold.class_probs:
            fold.class_probs.insert(position, 0.0)
    fold.class_probs = fold.class_probs or None
    return fold


def rescale_areas(setting: PostProcess, factor: float) -> PostProcess:
    """The setting with its pixel areas multiplied by `factor` (to apply it at another resolution)."""
    return dataclasses.replace(
        setting,
        min_area=round(setting.min_area * factor),
        min_component_area=round(setting.min_component_area * factor),
    )


def tune(fold: FoldPredictions, grid=None) -> list[tuple[PostProcess, float]]:
    """Every setting of the grid with its Dice at the model's resolution, best first, with the areas rescaled to
    the original resolution. The default grid searches the class gate when the model has a class head."""
    height, width = fold.resolution
    if grid is None:
        grid = default_grid(max(height, width), class_head=fold.class_probs is not None)
    probs = (prob.astype(np.float32) for prob in fold.probs)
    results = grid_search(probs, fold.truths, grid, fold.class_probs)
    original_height, original_width = fold.original_resolution
    factor = original_height * original_width / (height * width)
    return [(rescale_areas(setting, factor), dice) for setting, dice in results]


def format_table(results: list[tuple[PostProcess, float]], top: int = 10) -> str:
    """Plain aligned text: rank, Dice and the fields of each of the `top` best settings ('-' where unused)."""

    def cell(setting: PostProcess, name: str) -> str:
        value = getattr(setting, name)
        if name in _MODE_FIELDS["threshold"] | _MODE_FIELDS["triplet"] and name not in _MODE_FIELDS[setting.mode]:
            return "-"
        return "-" if value is None else str(value)

    header = ("rank", "dice", *TABLE_COLUMNS)
    rows = [(str(rank), f"{dice:.4f}", *(cell(s, name) for name in TABLE_COLUMNS))
            for rank, (s, dice) in enumerate(results[:top], start=1)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(row, widths)) for row in [header, *rows])


# ---------------------------------------------------------------------------------------------------- command line


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
        from siim_jax.cv import pooled_oof

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
    dicom_dir, labels, data_config = resolve_labelled_data(args, inference.config)
    fold_index = args.fold if args.fold is not None else (int(data_config.fold) if data_config is not None else None)
    if fold_index is None:
        raise SystemExit("the checkpoint's config names no validation fold: pass --fold")
    frame = labelled_frame(dicom_dir, labels, fold_index, data_config)
    return predict_fold(inference, frame), f"fold {fold_index}"
