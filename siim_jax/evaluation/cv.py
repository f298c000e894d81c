"""Cross-validation: every fold trained in turn, out-of-fold predictions, and a summary of the folds.

    siim-jax cv --config NAME[:ARG] --workdir W [--folds 0,1,2,3,4] [--best | --average-top K | --average-last K]

Fold k trains with `data.fold = k` into `W/fold_k` through `training.loop.train_and_evaluate`: a fold whose training
ended is marked by `W/fold_k/finished.json` and skipped, an interrupted one resumes from its latest checkpoint. Each
trained fold then predicts its own validation images (its latest checkpoint, or `--best` / `--average-top K` /
`--average-last K`) into `W/fold_k/oof.npz`: probabilities as float16, truths and the images' original sizes at the
training size `data.image_size` (masks resized nearest, as the training pipeline does), the class probabilities when
the model has a class head. That is what `siim-jax tune --oof W` tunes the post-processing on, all folds pooled.
`W/cv_summary.csv` and `W/cv_summary.png` give, per fold and pooled over the folds, the challenge Dice at threshold
0.5 (also gated by the class head), the Dice over positive images, IoU and the image-level AUC, all at the training
size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd

from siim_jax import config_utils
from siim_jax.evaluation.oof import OOF_FILE, FoldPredictions, concatenate, load_oof, oof_metrics, save_oof

FINISHED_FILE = "finished.json"
SUMMARY_CSV = "cv_summary.csv"
SUMMARY_PNG = "cv_summary.png"
SUMMARY_COLUMNS = ("dice", "dice_gated", "dice_positive", "iou", "auc", "n_images")

log = logging.getLogger(__name__)


class FoldInterrupted(RuntimeError):
    """A fold's training stopped on a signal; running `cv` again resumes it."""


def fold_dir(workdir: str | Path, fold: int) -> Path:
    return Path(workdir) / f"fold_{fold}"


def fold_config(config: ml_collections.ConfigDict, fold: int) -> ml_collections.ConfigDict:
    if not 0 <= fold < config.data.n_folds:
        raise ValueError(f"fold {fold} is not one of the config's {config.data.n_folds} folds (data.n_folds)")
    config = config_utils.from_dict(config)
    config.data.fold = fold
    return config


def train_fold(config: ml_collections.ConfigDict, workdir: Path, fold: int) -> dict:
    """Trains fold `fold` (resuming it) unless it has finished; returns its last validation metrics."""
    from siim_jax.training.loop import train_and_evaluate  # JAX and the training stack, only when a fold trains

    finished = fold_dir(workdir, fold) / FINISHED_FILE
    if finished.is_file():
        log.info("fold %d: finished earlier (%s), skipped", fold, finished)
        return json.loads(finished.read_text())
    result = train_and_evaluate(fold_config(config, fold), fold_dir(workdir, fold))
    if result["stopped_by"]:
        raise FoldInterrupted(f"fold {fold} stopped by {result['stopped_by']}; run `siim-jax cv` again to resume it")
    finished.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------- out of fold


def predict_out_of_fold(config: ml_collections.ConfigDict, workdir: Path, fold: int, *, best: bool = False,
                        average_top: int = 0, average_last: int = 0, batch_size: int = 8) -> FoldPredictions:
    """The fold's validation images predicted by its own model at `data.image_size`, as `tune` takes them."""
    from siim_jax.evaluation.evaluate import labelled_data, labelled_frame
    from siim_jax.evaluation.tune import predict_fold
    from siim_jax.inference.predictor import Inference

    config = fold_config(config, fold)
    inference = Inference.from_checkpoint(fold_dir(workdir, fold), best=best, average_top=average_top,
                                          average_last=average_last, image_size=int(config.data.image_size),
                                          batch_size=batch_size)
    dicom_dir, labels, _ = labelled_data(config)
    return predict_fold(inference, labelled_frame(dicom_dir, labels, fold, config.data))


# ---------------------------------------------------------------------------------------------------- summary


def summary_table(per_fold: dict[int, FoldPredictions]) -> pd.DataFrame:
    """One row per fold and a 'pooled' row over all their images, columns SUMMARY_COLUMNS."""
    rows = {f"fold {fold}": oof_metrics(predictions) for fold, predictions in per_fold.items()}
    rows["pooled"] = oof_metrics(concatenate(list(per_fold.values())))
    return pd.DataFrame.from_dict(rows, orient="index")[list(SUMMARY_COLUMNS)].rename_axis("folds")


def plot_summary(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars: each metric per fold and pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [name for name in SUMMARY_COLUMNS if name != "n_images"]
    figure, axis = plt.subplots(figsize=(1.6 + 1.3 * len(table), 4))
    width = 0.8 / len(metrics)
    positions = np.arange(len(table))
    for number, name in enumerate(metrics):
        axis.bar(positions + number * width, table[name].to_numpy(dtype=float), width, label=name)
    axis.set_xticks(positions + width * (len(metrics) - 1) / 2, table.index)
    axis.set_ylim(0, 1)
    axis.set_title("cross-validation at threshold 0.5 (out of fold)")
    axis.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_cv(config: ml_collections.ConfigDict, workdir: str | Path, folds: Sequence[int] | None = None, *,
           best: bool = False, average_top: int = 0, average_last: int = 0) -> pd.DataFrame:
    """Trains the folds (all of `data.n_folds` by default), writes their out-of-fold predictions and the summary;
    returns the summary table."""
    workdir = Path(workdir).absolute()
    folds = list(range(config.data.n_folds)) if folds is None else list(folds)
    per_fold = {}
    for fold in folds:
        train_fold(config, workdir, fold)
        oof = fold_dir(workdir, fold) / OOF_FILE
        if not oof.is_file():
            save_oof(oof, predict_out_of_fold(config, workdir, fold, best=best, average_top=average_top,
                                              average_last=average_last))
        per_fold[fold] = load_oof(oof)
    table = summary_table(per_fold)
    table.to_csv(workdir / SUMMARY_CSV)
    plot_summary(table, workdir / SUMMARY_PNG)
    return table
