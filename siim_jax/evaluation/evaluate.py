"""Challenge metrics of a checkpoint on labelled images: a per-image table, its summary and optional pictures.

    siim-jax evaluate --checkpoint DIR --data DICOM_DIR --labels CSV [--fold K] --out per_image.csv

Masks are predicted exactly as `predict` writes them (original size, post-processing from `--postprocess`) and
compared with the merged label masks at the original size. Prints the mean challenge Dice, IoU, Dice over the
positive images and the image-level ROC AUC of the positive score (class probability, or else the largest
pixel probability). An unreadable image counts as predicted empty, as it would in a submission. A repeated
`--checkpoint`, or `--ensemble JSON`, evaluates an ensemble (see siim_jax.inference.ensemble).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd

from siim_jax.data.labels import build_index, merged_mask
from siim_jax.data.layout import TRAIN_CSV, TRAIN_DIR
from siim_jax.inference.overlays import OverlayWriter
from siim_jax.inference.postprocess import PostProcess
from siim_jax.inference.predictor import Inference, Item, Prediction
from siim_jax.metrics import STAT_NAMES, MetricAccumulator, dice_from_areas, iou_from_areas

PER_IMAGE_COLUMNS = ("ImageId", "dice", "iou", "true_area", "pred_area", "score")


# ---------------------------------------------------------------------------------------------------- labelled data


def labelled_frame(dicom_dir, labels_csv, fold: int | None, data_config=None) -> pd.DataFrame:
    """One row per labelled image (image_id, path, rles, positive, area, fold), of one fold or all.

    Folds are drawn as training draws them, from `data_config`'s n_folds and fold_seed (defaults 5 and 0).
    """
    n_folds = int(data_config.n_folds) if data_config is not None else 5
    fold_seed = int(data_config.fold_seed) if data_config is not None else 0
    frame = build_index(dicom_dir, labels_csv, n_folds=n_folds, seed=fold_seed, strict=False).frame  # as training
    if fold is not None:
        if not 0 <= fold < n_folds:
            raise ValueError(f"fold must lie in [0, {n_folds}), got {fold}")
        frame = frame[frame["fold"] == fold]
    if frame.empty:
        raise ValueError(f"no labelled images in {dicom_dir}" + (f" fold {fold}" if fold is not None else ""))
    return frame.reset_index(drop=True)


def frame_items(frame: pd.DataFrame) -> list[Item]:
    """The (ImageId, path) items of an index frame, as `Inference.predictions` takes them."""
    return list(zip(frame["image_id"], frame["path"]))


def labelled_data(
    config: ml_collections.ConfigDict, data: Path | None = None, labels: Path | None = None
) -> tuple[Path, Path, ml_collections.ConfigDict | None]:
    """(DICOM folder, label CSV, data config or None): `data` and `labels` where given, else the training config's
    (`config` is a checkpoint's; a converted model's has no data section). ValueError when neither names them."""
    data_config = config.data if "data" in config else None
    if data and labels:
        return Path(data), Path(labels), data_config
    if data_config is None or not data_config.root:
        raise ValueError("the checkpoint's config names no data root: pass --data and --labels")
    root = Path(data_config.root)
    labels = labels or Path(data_config.labels_csv or root / TRAIN_CSV)
    return Path(data or root / TRAIN_DIR), Path(labels), data_config


# ---------------------------------------------------------------------------------------------------- evaluation


def positive_score(prediction: Prediction) -> float:
    """Image-level positive score: the class probability, or else the largest pixel probability (0 if unread)."""
    if prediction.class_prob is not None:
        return prediction.class_prob
    return 0.0 if prediction.prob is None else float(prediction.prob.max())


def evaluate_images(
    inference: Inference,
    frame: pd.DataFrame,
    postprocess: PostProcess = PostProcess(),
    overlays: OverlayWriter | None = None,
) -> pd.DataFrame:
    """Per-image results (columns PER_IMAGE_COLUMNS) of the frame's images, in its order."""
    rows = []
    for prediction in inference.predictions(frame_items(frame), desc="evaluate"):
        image_id, score = prediction.image_id, positive_score(prediction)
        label_row = frame.iloc[prediction.index]
        mask = prediction.mask(postprocess)
        if mask is None:  # unreadable: an empty prediction; the truth's area comes from the label rows
            rows.append((image_id, 0, 0, int(label_row["area"]), score))
            continue
        truth = merged_mask(label_row, prediction.original_size)
        areas = (int(np.count_nonzero(mask & truth)), int(mask.sum()), int(truth.sum()))
        rows.append((image_id, *areas, score))
        if overlays is not None:
            dice = float(dice_from_areas(*areas))
            overlays.add(prediction.index, image_id, prediction.pixels(), mask, truth, dice)
    return per_image_table(rows)


def per_image_table(rows: list[tuple]) -> pd.DataFrame:
    """The table of (ImageId, intersection, pred_area, true_area, score) rows, with each image's Dice and IoU."""
    table = pd.DataFrame(rows, columns=["ImageId", "intersection", "pred_area", "true_area", "score"])
    areas = (table["intersection"], table["pred_area"], table["true_area"])
    table.insert(1, "dice", dice_from_areas(*areas))
    table.insert(2, "iou", iou_from_areas(*areas))
    return table


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """`MetricAccumulator.summarise` (challenge Dice, IoU, positive-only Dice, AUC, ...) of a per-image table."""
    accumulator = MetricAccumulator()
    accumulator.add({name: table[name].to_numpy() for name in STAT_NAMES})
    return accumulator.summarise()


def format_summary(summary: dict[str, float]) -> str:
    return (
        f"challenge Dice {summary['dice']:.4f}  IoU {summary['iou']:.4f}  "
        f"positive-only Dice {summary['dice_positive']:.4f}  AUC {summary['auc']:.4f}  "
        f"({summary['n_images']} images)"
    )
