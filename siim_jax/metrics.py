"""Challenge metrics, accumulated exactly across batches and devices.

On device, `per_image_stats` reduces each image to four numbers; on the host, `MetricAccumulator`
concatenates them across batches and `summarise()` computes the metrics from all images at once, so
the result does not depend on how the images were batched or sharded.

Empty convention of the challenge: an image with empty truth scores 1 if the prediction is empty
too and 0 if any pixel is predicted; the same holds for IoU.
"""

import jax
import jax.numpy as jnp
import numpy as np

STAT_NAMES = ("intersection", "pred_area", "true_area", "score")


def _per_image_sum(x) -> jax.Array:
    return x.reshape(x.shape[0], -1).sum(axis=1, dtype=jnp.float32)


def per_image_stats(probs, masks, threshold=0.5, class_probs=None) -> dict[str, jax.Array]:
    """Per-image float32 statistics (N,) of a batch; jittable and fine on sharded batches.

    probs: (N, H, W[, 1]) pixel probabilities, binarised as probs > threshold. masks: truth of the
    same shape. 'score' is the image-level positive score for ROC AUC: `class_probs` (N[, 1]) when
    the model has a classification head, else the largest pixel probability of the image.
    Areas are exact in float32 up to 2**24 pixels per image.
    """
    probs = jnp.asarray(probs).astype(jnp.float32)
    pred = probs > threshold
    truth = jnp.asarray(masks) > 0
    n = probs.shape[0]
    score = probs.reshape(n, -1).max(axis=1) if class_probs is None else jnp.asarray(class_probs).reshape(n)
    return {
        "intersection": _per_image_sum(pred & truth),
        "pred_area": _per_image_sum(pred),
        "true_area": _per_image_sum(truth),
        "score": score.astype(jnp.float32),
    }


def dice_from_areas(intersection, pred_area, true_area) -> np.ndarray:
    """Per-image Dice 2|X∩Y| / (|X| + |Y|), 1 when both are empty."""
    intersection, total = np.asarray(intersection, np.float64), np.asarray(pred_area, np.float64) + true_area
    return np.where(total == 0, 1.0, 2.0 * intersection / np.maximum(total, 1.0))


def iou_from_areas(intersection, pred_area, true_area) -> np.ndarray:
    """Per-image IoU |X∩Y| / |X∪Y|, 1 when both are empty."""
    intersection = np.asarray(intersection, np.float64)
    union = np.asarray(pred_area, np.float64) + true_area - intersection
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1.0))


def roc_auc(scores, labels) -> float:
    """Exact ROC AUC as the Mann-Whitney U statistic (ties count one half); NaN with only one class."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_ranks = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each tied group
    rank_sum = average_ranks[group][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class MetricAccumulator:
    """Collects `per_image_stats` batches on the host and summarises them over all images."""

    def __init__(self):
        self._batches: list[dict[str, np.ndarray]] = []

    def add(self, stats, valid=None) -> None:
        """Adds one batch of stats; `valid` (N,) bool drops padding rows where False."""
        stats = jax.device_get(stats)
        keep = slice(None) if valid is None else np.asarray(valid, bool).reshape(-1)
        self._batches.append({name: np.asarray(stats[name], np.float64).reshape(-1)[keep] for name in STAT_NAMES})

    def stats(self) -> dict[str, np.ndarray]:
        """All per-image stats added so far, concatenated (float64)."""
        return {name: np.concatenate([b[name] for b in self._batches] or [np.zeros(0)]) for name in STAT_NAMES}

    def summarise(self) -> dict[str, float]:
        """{'dice', 'dice_gated', 'iou', 'dice_positive', 'auc', 'n_images'}; means are NaN when no image qualifies.

        'dice_gated' empties the prediction of every image whose 'score' is below 0.5: the classification head's
        verdict, as segmentation-plus-classification models are used (without a head the score is the top pixel
        probability, so at threshold 0.5 it equals 'dice'). 'dice_positive' averages over images with non-empty
        truth; 'auc' ranks 'score' against the truth being non-empty and is NaN unless both classes are present.
        """
        s = self.stats()
        areas = (s["intersection"], s["pred_area"], s["true_area"])
        dice = dice_from_areas(*areas)
        kept = s["score"] >= 0.5
        gated_dice = dice_from_areas(s["intersection"] * kept, s["pred_area"] * kept, s["true_area"])
        positive = s["true_area"] > 0
        return {
            "dice": _mean_or_nan(dice),
            "dice_gated": _mean_or_nan(gated_dice),
            "iou": _mean_or_nan(iou_from_areas(*areas)),
            "dice_positive": _mean_or_nan(dice[positive]),
            "auc": roc_auc(s["score"], positive),
            "n_images": int(dice.size),
        }


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")
