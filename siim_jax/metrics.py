"""Challenge metrics, accumulated exactly across batches and devices.

On device, `per_image_stats` reduces each image to a few numbers; on the host, `MetricAccumulator`
concatenates them across batches and `summarise()` computes the metrics from all images at once, so
the result does not depend on how the images were batched or sharded.

Empty convention of the challenge: an image with empty truth scores 1 if the prediction is empty
too and 0 if any pixel is predicted; the same holds for IoU.
"""

import jax
import jax.numpy as jnp
import numpy as np

STAT_NAMES = ("intersection", "pred_area", "true_area", "score")
PP_STAT_NAMES = ("pp_intersection", "pp_pred_area", "top_count", "n_pixels")  # for 'dice_pp'

# The small post-processing grid of 'dice_pp': the triplet rule and the class gate of
# `postprocess.default_grid`, coarser (4 x 3 x 5 x 4 settings), without component removal.
PP_BOTTOM_THRESHOLDS = (0.3, 0.4, 0.5, 0.6)
PP_TOP_THRESHOLDS = (0.5, 0.7, 0.9)
PP_MIN_AREAS_1024 = (0, 500, 1000, 2000, 4000)  # pixels at 1024², scaled to the probability map's size
PP_CLASS_THRESHOLDS = (None, 0.3, 0.5, 0.7)  # gates on 'score'


def _per_image_sum(x) -> jax.Array:
    return x.reshape(x.shape[0], -1).sum(axis=1, dtype=jnp.float32)


def per_image_stats(probs, masks, threshold=0.5, class_probs=None) -> dict[str, jax.Array]:
    """Per-image float32 statistics (N,) of a batch; jittable and fine on sharded batches.

    probs: (N, H, W[, 1]) pixel probabilities, binarised as probs > threshold. masks: truth of the
    same shape. 'score' is the image-level positive score for ROC AUC: `class_probs` (N[, 1]) when
    the model has a classification head, else the largest pixel probability of the image.
    Areas are exact in float32 up to 2**24 pixels per image. PP_STAT_NAMES feed 'dice_pp': intersections and
    areas at each of PP_BOTTOM_THRESHOLDS (N, 4), pixel counts above each of PP_TOP_THRESHOLDS (N, 3) and the
    image's pixel count (N,).
    """
    probs = jnp.asarray(probs).astype(jnp.float32)
    pred = probs > threshold
    truth = jnp.asarray(masks) > 0
    n = probs.shape[0]
    score = probs.reshape(n, -1).max(axis=1) if class_probs is None else jnp.asarray(class_probs).reshape(n)
    bottoms = jnp.stack([probs > t for t in PP_BOTTOM_THRESHOLDS], axis=-1).reshape(n, -1, len(PP_BOTTOM_THRESHOLDS))
    flat_truth = truth.reshape(n, -1, 1)
    return {
        "intersection": _per_image_sum(pred & truth),
        "pred_area": _per_image_sum(pred),
        "true_area": _per_image_sum(truth),
        "score": score.astype(jnp.float32),
        "pp_intersection": (bottoms & flat_truth).sum(axis=1, dtype=jnp.float32),
        "pp_pred_area": bottoms.sum(axis=1, dtype=jnp.float32),
        "top_count": jnp.stack([_per_image_sum(probs > t) for t in PP_TOP_THRESHOLDS], axis=-1),
        "n_pixels": jnp.full((n,), probs[0].size, jnp.float32),
    }


def postprocessed_dice(stats: dict[str, np.ndarray]) -> float:
    """The best mean challenge Dice over the small grid PP_* of triplet rules and class gates (in-sample).

    A stand-in for the Dice after `tune`: what ranks checkpoints (siim_jax.training.checkpoints). An image is kept
    when its score passes the class gate and at least `min_area` pixels exceed the top threshold; a kept image is
    binarised at the bottom threshold, an image not kept is predicted empty.
    """
    empty = (stats["true_area"] == 0).astype(np.float64)
    kept_dice = dice_from_areas(stats["pp_intersection"], stats["pp_pred_area"], stats["true_area"][:, None])
    scale = stats["n_pixels"][:, None] / 1024**2
    min_areas = np.round(np.asarray(PP_MIN_AREAS_1024)[None, :] * scale)  # (N, areas), as default_grid rounds
    area_ok = stats["top_count"][:, :, None] >= min_areas[:, None, :]  # (N, tops, areas)
    gates = [np.ones_like(empty, bool) if c is None else stats["score"] >= c for c in PP_CLASS_THRESHOLDS]
    keep = area_ok[:, :, :, None] & np.stack(gates, axis=-1)[:, None, None, :]  # (N, tops, areas, gates)
    dice = np.where(keep[..., None], kept_dice[:, None, None, None, :], empty[:, None, None, None, None])
    return float(dice.mean(axis=0).max()) if len(empty) else float("nan")


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
        batch = {name: np.asarray(stats[name], np.float64).reshape(-1)[keep] for name in STAT_NAMES}
        if PP_STAT_NAMES[0] in stats:  # per-image rows of one or more values
            batch.update({name: np.asarray(stats[name], np.float64)[keep] for name in PP_STAT_NAMES})
        self._batches.append(batch)

    def stats(self) -> dict[str, np.ndarray]:
        """All per-image stats added so far, concatenated (float64); PP_STAT_NAMES only when every batch had them."""
        names = STAT_NAMES + (PP_STAT_NAMES if all(PP_STAT_NAMES[0] in b for b in self._batches) else ())
        return {name: np.concatenate([b[name] for b in self._batches]) if self._batches else np.zeros(0)
                for name in names}

    def summarise(self) -> dict[str, float]:
        """{'dice', 'dice_gated', 'iou', 'dice_positive', 'auc', 'n_images'} and, when the batches had
        PP_STAT_NAMES, 'dice_pp' (`postprocessed_dice`); means are NaN when no image qualifies.

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
        summary = {
            "dice": _mean_or_nan(dice),
            "dice_gated": _mean_or_nan(gated_dice),
            "iou": _mean_or_nan(iou_from_areas(*areas)),
            "dice_positive": _mean_or_nan(dice[positive]),
            "auc": roc_auc(s["score"], positive),
            "n_images": int(dice.size),
        }
        if PP_STAT_NAMES[0] in s:
            summary["dice_pp"] = postprocessed_dice(s)
        return summary


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")
