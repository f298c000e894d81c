"""Out-of-fold predictions: what `siim-jax cv` writes per fold and `tune --oof` pools.

`fold_k/oof.npz` holds a fold's validation images predicted by its own model at the training size: probabilities as
float16, truths, original sizes and, for a model with a class head, class probabilities.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from siim_jax.metrics import MetricAccumulator

OOF_FILE = "oof.npz"


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
