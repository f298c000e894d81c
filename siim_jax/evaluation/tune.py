"""Grid search of the post-processing on the validation fold, for `predict --postprocess`.

    siim-jax tune --checkpoint DIR --fold K [--out postprocess.json]
    siim-jax tune --oof CV_WORKDIR [--oof CV_WORKDIR ...] [--out postprocess.json]

Predicts the fold's images at the model's resolution, scores every setting of the grid (the default grid of
`postprocess.default_grid`, or `--grid JSON`) by the mean challenge Dice against the label masks resized to
that resolution (nearest, as the training pipeline does), prints the best settings and writes the best one.
Its areas are written at the images' original resolution (1024² for the challenge), where `predict` applies it.
With `--oof` it tunes on the out-of-fold predictions of `siim-jax cv` runs (siim_jax.evaluation.oof) without
predicting; with several `--checkpoint`s or `--ensemble`, on the ensemble's predictions (siim_jax.inference.ensemble).
"""

from __future__ import annotations

import collections
import dataclasses

import cv2
import numpy as np
import pandas as pd

from siim_jax.data.labels import merged_mask
from siim_jax.evaluation.evaluate import frame_items
from siim_jax.evaluation.oof import FoldPredictions
from siim_jax.inference.postprocess import PostProcess, default_grid, grid_search
from siim_jax.inference.predictor import Inference

TABLE_COLUMNS = ("mode", "threshold", "top_threshold", "min_area", "bottom_threshold", "min_component_area",
                 "class_threshold")
_MODE_FIELDS = {"threshold": {"threshold"}, "triplet": {"top_threshold", "min_area", "bottom_threshold"}}


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
