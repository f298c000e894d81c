"""Cross-validation: every fold trained in turn, out-of-fold predictions, and a summary of the folds.

    siim-jax cv --config NAME[:ARG] --workdir W [--folds 0,1,2,3,4] [--best | --average-top K]

Fold k trains with `data.fold = k` into `W/fold_k` through `train.train_and_evaluate`: a fold whose training ended
is marked by `W/fold_k/finished.json` and skipped, an interrupted one resumes from its latest checkpoint. Each
trained fold then predicts its own validation images (its latest checkpoint, or `--best` / `--average-top K`) into
`W/fold_k/oof.npz`: probabilities as float16, truths and the images' original sizes at the training size
`data.image_size` (masks resized nearest, as the training pipeline does), the class probabilities when the model has
a class head. That is what `siim-jax tune --oof W` tunes the post-processing on, all folds pooled. `W/cv_summary.csv`
and `W/cv_summary.png` give, per fold and pooled over the folds, the challenge Dice at threshold 0.5 (also gated
by the class head), the Dice over positive images, IoU and the image-level AUC, all at the training size.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd

from siim_jax import config_utils
from siim_jax.metrics import MetricAccumulator
from siim_jax.tune import FoldPredictions

FINISHED_FILE = "finished.json"
OOF_FILE = "oof.npz"
SUMMARY_CSV = "cv_summary.csv"
SUMMARY_PNG = "cv_summary.png"
SUMMARY_COLUMNS = ("dice", "dice_gated", "dice_positive", "iou", "auc", "n_images")


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
    from siim_jax.train import train_and_evaluate  # JAX and the training stack, only when a fold trains

    finished = fold_dir(workdir, fold) / FINISHED_FILE
    if finished.is_file():
        print(f"fold {fold}: finished earlier ({finished}), skipped")
        return json.loads(finished.read_text())
    result = train_and_evaluate(fold_config(config, fold), fold_dir(workdir, fold))
    if result["stopped_by"]:
        raise FoldInterrupted(f"fold {fold} stopped by {result['stopped_by']}; run `siim-jax cv` again to resume it")
    finished.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------- out of fold


def predict_out_of_fold(config: ml_collections.ConfigDict, workdir: Path, fold: int, *, best: bool = False,
                        average_top: int = 0, batch_size: int = 8) -> FoldPredictions:
    """The fold's validation images predicted by its own model at `data.image_size`, as `tune` takes them."""
    from siim_jax.evaluate import labelled_frame, resolve_labelled_data
    from siim_jax.predict import Inference
    from siim_jax.tune import predict_fold

    config = fold_config(config, fold)
    inference = Inference.from_checkpoint(fold_dir(workdir, fold), best=best, average_top=average_top,
                                          image_size=int(config.data.image_size), batch_size=batch_size)
    dicom_dir, labels, _ = resolve_labelled_data(argparse.Namespace(data=None, labels=None), config)
    return predict_fold(inference, labelled_frame(dicom_dir, labels, fold, config.data))


def save_oof(path: Path, predictions: FoldPredictions) -> None:
    """Writes the predictions as one .npz, atomically (a rerun recomputes a missing file, never reads half of one)."""
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(
        temporary,
        image_ids=np.asarray(predictions.image_ids),
        probs=np.stack(predictions.probs).astype(np.float16),
        truths=np.stack(predictions.truths),
        class_probs=np.asarray(predictions.class_probs if predictions.class_probs is not None else [], np.float32),
        original_sizes=np.asarray(predictions.original_sizes, np.int64),
    )
    os.replace(temporary, path)


def load_oof(path: Path) -> FoldPredictions:
    with np.load(path) as saved:
        class_probs = saved["class_probs"].tolist()
        return FoldPredictions(
            saved["image_ids"].tolist(), list(saved["probs"]), list(saved["truths"]), class_probs or None,
            [tuple(size) for size in saved["original_sizes"].tolist()],
        )


def fold_oof_files(workdir: str | Path) -> dict[int, Path]:
    """{fold: its out-of-fold file} of a CV workdir; an error names the folder when there is none."""
    files = {int(path.parent.name.removeprefix("fold_")): path for path in Path(workdir).glob(f"fold_*/{OOF_FILE}")}
    if not files:
        raise FileNotFoundError(f"{workdir}: no fold_<k>/{OOF_FILE}; run `siim-jax cv` there first")
    return dict(sorted(files.items()))


def concatenate(parts: Sequence[FoldPredictions]) -> FoldPredictions:
    class_heads = {part.class_probs is not None for part in parts}
    if len(class_heads) > 1:
        raise ValueError("some folds have class probabilities and some do not")
    return FoldPredictions(
        [image_id for part in parts for image_id in part.image_ids],
        [prob for part in parts for prob in part.probs],
        [truth for part in parts for truth in part.truths],
        [prob for part in parts for prob in part.class_probs] if class_heads == {True} else None,
        [size for part in parts for size in part.original_sizes],
    )


def pooled_oof(workdirs: Sequence[str | Path]) -> FoldPredictions:
    """All folds of a CV run pooled; of several runs over the same images (an ensemble), their probabilities
    averaged (resized to the first run's size) and the class probabilities of the runs that have them averaged."""
    import cv2

    runs = [concatenate([load_oof(path) for path in fold_oof_files(workdir).values()]) for workdir in workdirs]
    if len(runs) == 1:
        return runs[0]
    first, others = runs[0], runs[1:]
    height, width = first.resolution
    positions = []
    for workdir, run in zip(workdirs[1:], others):
        where = {image_id: i for i, image_id in enumerate(run.image_ids)}
        missing = [image_id for image_id in first.image_ids if image_id not in where]
        if missing:
            raise ValueError(f"{workdir} has no out-of-fold prediction of {len(missing)} images, e.g. {missing[:3]}")
        positions.append([where[image_id] for image_id in first.image_ids])
    probs = []
    for i, prob in enumerate(first.probs):
        total = prob.astype(np.float32)
        for run, position in zip(others, positions):
            other = run.probs[position[i]].astype(np.float32)
            total += cv2.resize(other, (width, height), interpolation=cv2.INTER_LINEAR)
        probs.append((total / len(runs)).astype(np.float16))
    class_runs = [(run, position) for run, position in zip(others, positions) if run.class_probs is not None]
    if first.class_probs is not None:
        class_runs.insert(0, (first, range(len(first.image_ids))))
    class_probs = None
    if class_runs:
        class_probs = [float(np.mean([run.class_probs[position[i]] for run, position in class_runs]))
                       for i in range(len(first.image_ids))]
    return FoldPredictions(first.image_ids, probs, first.truths, class_probs, first.original_sizes)


# ---------------------------------------------------------------------------------------------------- summary


def oof_metrics(predictions: FoldPredictions, threshold: float = 0.5) -> dict[str, float]:
    """`MetricAccumulator.summarise` of the predictions binarised at `threshold`, at their resolution."""
    stats = {name: [] for name in ("intersection", "pred_area", "true_area", "score")}
    for i, (prob, truth) in enumerate(zip(predictions.probs, predictions.truths)):
        predicted = prob > threshold
        stats["intersection"].append(np.count_nonzero(predicted & truth))
        stats["pred_area"].append(np.count_nonzero(predicted))
        stats["true_area"].append(np.count_nonzero(truth))
        stats["score"].append(predictions.class_probs[i] if predictions.class_probs else float(prob.max()))
    accumulator = MetricAccumulator()
    accumulator.add({name: np.asarray(values, np.float64) for name, values in stats.items()})
    return accumulator.summarise()


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
           best: bool = False, average_top: int = 0) -> pd.DataFrame:
    """Trains the folds (all of `data.n_folds` by default), writes their out-of-fold predictions and the summary;
    returns the summary table."""
    workdir = Path(workdir).absolute()
    folds = list(range(config.data.n_folds)) if folds is None else list(folds)
    per_fold = {}
    for fold in folds:
        train_fold(config, workdir, fold)
        oof = fold_dir(workdir, fold) / OOF_FILE
        if not oof.is_file():
            save_oof(oof, predict_out_of_fold(config, workdir, fold, best=best, average_top=average_top))
        per_fold[fold] = load_oof(oof)
    table = summary_table(per_fold)
    table.to_csv(workdir / SUMMARY_CSV)
    plot_summary(table, workdir / SUMMARY_PNG)
    return table


# ---------------------------------------------------------------------------------------------------- command line


def _fold_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"folds look like 0,1,2; got {text!r}") from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Parsed by config_flags (config_utils.parse_args_with_config); declared here for --help.
    parser.add_argument("--config", metavar="NAME[:ARG]",
                        help="the recipe of every fold; override its fields with --config.a.b=value")
    parser.add_argument("--workdir", required=True, type=Path, help="fold k trains into WORKDIR/fold_k")
    parser.add_argument("--folds", type=_fold_list, metavar="0,1,...",
                        help="the folds to train (default: all data.n_folds)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--best", action="store_true", help="out-of-fold predictions from each fold's best step")
    which.add_argument("--average-top", type=int, default=0, metavar="K",
                       help="out-of-fold predictions from each fold's K best steps averaged")


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    return config_utils.parse_args_with_config(parser, argv)


def run(args: argparse.Namespace) -> int:
    try:
        table = run_cv(args.config, args.workdir, args.folds, best=args.best, average_top=args.average_top)
    except (FoldInterrupted, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"siim-jax cv: {error}") from error
    print(table.round(4).to_string())
    print(f"wrote {args.workdir / SUMMARY_CSV}, {args.workdir / SUMMARY_PNG} and fold_<k>/{OOF_FILE} "
          f"(tune on them: siim-jax tune --oof {args.workdir})")
    return 0
