"""Predictions → post-processed masks → a challenge submission, written durably.

    siim-jax predict --checkpoint DIR [--step N | --best | --average-top K] --data DICOM_DIR --out submission.csv

A pool of threads resizes the probabilities back to each image's original size (bilinear, in float),
post-processes them and encodes them in the challenge's relative RLE while the next predictions arrive. The
submission has exactly one row per image, `-1` for empty or unreadable ones, and appears atomically, synced to disk;
with a `dicom_seg.DicomSegWriter`, each non-empty final mask also becomes a DICOM Segmentation object.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from siim_jax.data import rle
from siim_jax.data.labels import ENCODED_PIXELS, IMAGE_ID, find_dicoms, read_image_ids
from siim_jax.files import durable_file
from siim_jax.inference.overlays import OverlayWriter
from siim_jax.inference.postprocess import PostProcess
from siim_jax.inference.predictor import Item, Prediction

if TYPE_CHECKING:  # highdicom loads only when DICOM SEG is asked for
    from siim_jax.inference.dicom_seg import DicomSegWriter

POSTPROCESS_THREADS = max(1, min(len(os.sched_getaffinity(0)), 4))  # resize, post-process and RLE, beside decoding


class SubmissionError(ValueError):
    """A submission that would not match the expected ImageIds; nothing is written."""



def write_submission(path, rows: Sequence[tuple[str, str]], expected_ids: Sequence[str] | None = None) -> None:
    """Writes `ImageId,EncodedPixels` atomically (temp file + rename), synced so that a power cut leaves the
    previous file or the whole new one: the file's data before the rename, the folder's entries before and after
    it. With `expected_ids`, refuses (raising `SubmissionError`, writing nothing) unless the rows hold exactly
    those ids, once each. Ids that would break a CSV line (a comma, quote or line break, e.g. from a file name)
    are refused too."""
    ids = [image_id for image_id, _ in rows]
    malformed = [image_id for image_id in ids if any(character in image_id for character in ',"\r\n')]
    if malformed:
        raise SubmissionError(f"ImageIds that would break the CSV (comma, quote or line break): {malformed[:5]!r}")
    duplicated = sorted(image_id for image_id, count in collections.Counter(ids).items() if count > 1)
    if duplicated:
        raise SubmissionError(f"ImageIds with several rows: {duplicated[:5]}")
    if expected_ids is not None:
        expected = set(expected_ids)
        missing, extra = sorted(expected - set(ids)), sorted(set(ids) - expected)
        if missing or extra:
            raise SubmissionError(
                f"submission does not match the sample submission: {len(ids)} rows for {len(expected)} ids, "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
            )
    with durable_file(path) as temporary, open(temporary, "x", newline="") as file:
        file.write(f"{IMAGE_ID},{ENCODED_PIXELS}\n")
        file.writelines(f"{image_id},{encoded}\n" for image_id, encoded in rows)


@dataclasses.dataclass(frozen=True)
class PredictSummary:
    n_images: int
    n_positive: int
    unreadable: tuple[str, ...]
    elapsed_s: float
    first_batch: int  # images in the first batch
    first_batch_s: float  # seconds until its last prediction arrived, compilation included

    @property
    def images_per_s(self) -> float:
        return self.n_images / max(self.elapsed_s, 1e-9)

    @property
    def steady_images_per_s(self) -> float | None:
        """Throughput after the first batch (without compilation); None when there was one batch only."""
        later = self.n_images - self.first_batch
        return later / max(self.elapsed_s - self.first_batch_s, 1e-9) if later > 0 else None

    def report(self) -> str:
        text = (
            f"predicted {self.n_images} images ({self.n_positive} with a mask) in {self.elapsed_s:.1f} s: "
            f"{self.images_per_s:.2f} images/s"
        )
        if self.steady_images_per_s is not None:
            text += (f", {self.steady_images_per_s:.2f} images/s after the first batch "
                     f"({self.first_batch} images in {self.first_batch_s:.1f} s with compilation)")
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable, written as -1: {', '.join(self.unreadable[:5])}"
        return text


def submission_items(dicom_dir, sample_submission=None) -> list[Item]:
    """(ImageId, path) of every image to predict: the sample submission's ids in its order (path None where
    no file has that id), or else every DICOM under `dicom_dir` sorted by ImageId."""
    files = find_dicoms(dicom_dir)
    if sample_submission is None:
        return sorted(files.items())
    expected = read_image_ids(sample_submission)
    unexpected = len(set(files) - set(expected))
    if unexpected:
        warnings.warn(f"{unexpected} DICOM files under {dicom_dir} are not in {sample_submission}; skipped",
                      stacklevel=2)
    return [(image_id, files.get(image_id)) for image_id in expected]


def _encode(prediction: Prediction, postprocess: PostProcess) -> tuple[str, np.ndarray | None]:
    """(RLE, mask) of a prediction at its original size; ('-1', None) when the image was unreadable."""
    mask = prediction.mask(postprocess)
    return (rle.EMPTY, None) if mask is None else (rle.encode(mask), mask)


def predict_submission(
    inference,
    items: Sequence[Item],
    out,
    postprocess: PostProcess = PostProcess(),
    expected_ids: Sequence[str] | None = None,
    overlays: OverlayWriter | None = None,
    dicom_seg: DicomSegWriter | None = None,
) -> PredictSummary:
    """Predicts every item (see `submission_items`) with an `Inference` or an `ensemble.Ensemble`, writes the
    submission to `out`, given an `OverlayWriter` the overlays of its selected images and, given an
    `inference.dicom_seg.DicomSegWriter`, the DICOM Segmentations of the final masks of its readable images.
    Post-processing and RLE encoding run on POSTPROCESS_THREADS threads while the next predictions arrive."""
    start = time.perf_counter()
    first_batch = min(inference.batch_size, len(items))
    first_batch_s = 0.0
    rows, unreadable = {}, []

    def finish(prediction: Prediction, encoded: concurrent.futures.Future) -> None:
        rows[prediction.image_id], mask = encoded.result()
        if mask is None:
            unreadable.append(prediction.image_id)
        elif overlays is not None and overlays.selected(prediction.index):
            overlays.add(prediction.index, prediction.image_id, prediction.pixels(), mask)
        if mask is not None and dicom_seg is not None:
            dicom_seg.add(prediction.path, mask)

    with concurrent.futures.ThreadPoolExecutor(POSTPROCESS_THREADS) as pool:
        pending = collections.deque()  # in order; bounded to a batch beyond what the threads are working on
        limit = inference.batch_size + POSTPROCESS_THREADS
        for count, prediction in enumerate(inference.predictions(items), start=1):
            if count == first_batch:
                first_batch_s = time.perf_counter() - start
            pending.append((prediction, pool.submit(_encode, prediction, postprocess)))
            while pending and (pending[0][1].done() or len(pending) > limit):
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    ordered = [(image_id, rows[image_id]) for image_id, _ in items]
    write_submission(out, ordered, expected_ids)
    return PredictSummary(
        n_images=len(ordered),
        n_positive=sum(encoded != rle.EMPTY for _, encoded in ordered),
        unreadable=tuple(unreadable),
        elapsed_s=time.perf_counter() - start,
        first_batch=first_batch,
        first_batch_s=first_batch_s,
    )
