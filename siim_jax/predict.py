"""Checkpoint → probabilities → masks → submission, and the inference core that `tune` and `evaluate` share.

    siim-jax predict --checkpoint DIR [--step N | --best | --average-top K] --data DICOM_DIR --out submission.csv

Images are decoded and preprocessed on host threads (the validation preprocessing of the training pipeline),
batched at a fixed size, and run by one jitted function sharded along the batch over all devices, with
horizontal-flip TTA. Probabilities are resized back to each image's original size (bilinear, in float),
post-processed and encoded in the challenge's relative RLE. The submission has exactly one row per image, `-1`
for empty ones, and appears atomically. A missing or unreadable DICOM becomes a `-1` row and a warning naming
it (`--on-error empty`, the default) or stops the run (`--on-error fail`).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from siim_jax import sharding as sharding_lib
from siim_jax.data import rle
from siim_jax.data.augment import normalise, resize_pair
from siim_jax.data.dicom import DicomError, read_dicom
from siim_jax.data.labels import ENCODED_PIXELS, IMAGE_ID, find_dicoms, read_image_ids
from siim_jax.overlays import OverlayWriter
from siim_jax.postprocess import PostProcess

ON_ERROR = ("empty", "fail")
Preprocess = Callable[[np.ndarray], np.ndarray]  # uint8 (H, W) radiograph → float32 (S, S, 3) model input


class UnreadableImageWarning(UserWarning):
    """A test image that could not be read and is predicted empty."""


class SubmissionError(ValueError):
    """A submission that would not match the expected ImageIds; nothing is written."""


# ---------------------------------------------------------------------------------------------------- device side


def predict_probabilities(model: nnx.Module, images: jax.Array, tta_hflip: bool = True):
    """Mask probabilities (N, H, W) float32 and class probabilities (N,) (None without a class head).

    With `tta_hflip`, sigmoid outputs on the images and on their mirror images (mirrored back) are averaged.
    The model must be in eval mode; images are NHWC as the model takes them.
    """
    if tta_hflip:
        images = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
    outputs = model(images)
    mask_logits, class_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
    probs = jax.nn.sigmoid(mask_logits[..., 0].astype(jnp.float32))
    class_probs = None if class_logits is None else jax.nn.sigmoid(class_logits[:, 0].astype(jnp.float32))
    if tta_hflip:
        plain, mirrored = jnp.split(probs, 2)
        probs = (plain + mirrored[:, :, ::-1]) / 2
        class_probs = None if class_probs is None else jnp.mean(jnp.stack(jnp.split(class_probs, 2)), axis=0)
    return probs, class_probs


def _forward(graphdef, state, images, tta_hflip):
    return predict_probabilities(nnx.merge(graphdef, state), images, tta_hflip)


class Predictor:
    """`predict_probabilities` jitted once for a fixed batch, sharded along the batch over all devices; the model
    is put in eval mode.

    The batch size is rounded up to a multiple of the device count; shorter batches are zero-padded, so every
    call reuses the one compiled function. `dispatch` returns at once (JAX runs asynchronously) and `fetch`
    brings the results of a dispatched batch to the host, so the host can prepare the next batch meanwhile.
    """

    def __init__(self, model: nnx.Module, batch_size: int = 8, tta_hflip: bool = True):
        model.eval()
        graphdef, state = nnx.split(model)
        mesh = sharding_lib.data_mesh()
        self.batch_size = math.ceil(batch_size / mesh.size) * mesh.size
        self._batch_sharding = sharding_lib.batch_sharding(mesh)
        self._state = jax.device_put(state, sharding_lib.replicated(mesh))
        self._forward = jax.jit(functools.partial(_forward, graphdef, tta_hflip=tta_hflip))

    def dispatch(self, images: np.ndarray):
        count = len(images)
        if not 0 < count <= self.batch_size:
            raise ValueError(f"a batch holds 1 to {self.batch_size} images, got {count}")
        padded = np.zeros((self.batch_size, *images.shape[1:]), np.float32)
        padded[:count] = images
        return self._forward(self._state, jax.device_put(padded, self._batch_sharding)), count

    @staticmethod
    def fetch(dispatched) -> tuple[np.ndarray, np.ndarray | None]:
        (probs, class_probs), count = dispatched
        probs, class_probs = jax.device_get((probs, class_probs))
        return probs[:count], None if class_probs is None else class_probs[:count]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.fetch(self.dispatch(images))


# ---------------------------------------------------------------------------------------------------- host side


def validation_preprocess(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """The training pipeline's validation transform: bilinear resize, ImageNet normalisation, grey → 3 channels."""
    return normalise(resize_pair(pixels, None, image_size)[0])


@dataclasses.dataclass
class LoadedImage:
    """One image to predict: its decoded pixels and model input, or the reason it could not be read."""

    index: int
    image_id: str
    pixels: np.ndarray | None = None  # uint8 (H, W) at the original size
    model_input: np.ndarray | None = None
    error: str | None = None


@dataclasses.dataclass
class Prediction:
    """The model's output for one image at the model's resolution (`prob` None when the image was unreadable)."""

    image: LoadedImage
    prob: np.ndarray | None
    class_prob: float | None

    @property
    def original_size(self) -> tuple[int, int]:
        return self.image.pixels.shape

    def prob_at_original_size(self) -> np.ndarray:
        height, width = self.original_size
        if self.prob.shape == (height, width):
            return self.prob
        return cv2.resize(self.prob, (width, height), interpolation=cv2.INTER_LINEAR)

    def mask(self, postprocess: PostProcess) -> np.ndarray | None:
        """The post-processed bool mask at the original size; None when the image was unreadable."""
        if self.prob is None:
            return None
        return postprocess.apply(self.prob_at_original_size(), self.class_prob)


def _load(index: int, image_id: str, path: str | None, preprocess: Preprocess, on_error: str) -> LoadedImage:
    try:
        if path is None:
            raise DicomError(f"<{image_id}.dcm>", "no DICOM file with this ImageId in the data folder")
        pixels = read_dicom(path).pixels
    except DicomError as exc:
        if on_error == "fail":
            raise
        return LoadedImage(index, image_id, error=str(exc))
    return LoadedImage(index, image_id, pixels, np.asarray(preprocess(pixels), np.float32))


def _bounded_map(function: Callable, items: Iterable, workers: int, ahead: int) -> Iterator:
    """map(function, items) in order on `workers` threads, never more than `ahead` results pending."""
    if workers <= 1:
        yield from map(function, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def load_images(
    items: Sequence[tuple[str, str | None]], preprocess: Preprocess, on_error: str = "empty", workers: int = 2
) -> Iterator[LoadedImage]:
    """Reads (ImageId, path or None) items in order; unreadable ones carry `error` and warn (`on_error='empty'`)
    or raise `DicomError` (`on_error='fail'`)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    load = functools.partial(_load, preprocess=preprocess, on_error=on_error)
    jobs = ((index, image_id, path) for index, (image_id, path) in enumerate(items))
    for image in _bounded_map(lambda job: load(*job), jobs, workers, ahead=4 * max(workers, 1)):
        if image.error is not None:
            warnings.warn(f"ImageId {image.image_id} predicted empty: {image.error}", UnreadableImageWarning, 2)
        yield image


def _batches(images: Iterable[LoadedImage], size: int) -> Iterator[list[LoadedImage]]:
    """Consecutive images, each list holding `size` readable ones (the last may hold fewer) and the unreadable
    ones between them, so that predictions keep the images' order."""
    batch, readable = [], 0
    for image in images:
        batch.append(image)
        readable += image.error is None
        if readable == size:
            yield batch
            batch, readable = [], 0
    if batch:
        yield batch


def predict_images(predictor: Predictor, images: Iterable[LoadedImage]) -> Iterator[Prediction]:
    """Predictions of the images in order; one batch runs on the devices while the next one is gathered."""
    in_flight = None
    for batch in _batches(images, predictor.batch_size):
        inputs = [image.model_input for image in batch if image.error is None]
        dispatched = predictor.dispatch(np.stack(inputs)) if inputs else None
        if in_flight is not None:
            yield from _unbatch(predictor, *in_flight)
        in_flight = (batch, dispatched)
    if in_flight is not None:
        yield from _unbatch(predictor, *in_flight)


def _unbatch(predictor: Predictor, batch: list[LoadedImage], dispatched) -> Iterator[Prediction]:
    probs, class_probs = predictor.fetch(dispatched) if dispatched is not None else ([], None)
    position = 0
    for image in batch:
        if image.error is not None:
            yield Prediction(image, None, None)
            continue
        yield Prediction(image, probs[position], None if class_probs is None else float(class_probs[position]))
        position += 1


@dataclasses.dataclass
class Inference:
    """A jitted model with its preprocessing and the host-side options: what `predict`, `tune` and `evaluate` run."""

    predictor: Predictor
    preprocess: Preprocess
    on_error: str = "empty"
    workers: int = 2
    progress: bool = True

    def predictions(self, items: Sequence[tuple[str, str | None]], desc: str = "predict") -> Iterator[Prediction]:
        """Predictions of (ImageId, path or None) items, in order, under a progress bar."""
        images = load_images(items, self.preprocess, self.on_error, self.workers)
        return tqdm(predict_images(self.predictor, images), total=len(items), desc=desc, unit="img",
                    disable=not self.progress)


# ---------------------------------------------------------------------------------------------------- submission


def write_submission(path, rows: Sequence[tuple[str, str]], expected_ids: Sequence[str] | None = None) -> None:
    """Writes `ImageId,EncodedPixels` atomically (temp file + rename). With `expected_ids`, refuses (raising
    `SubmissionError`, writing nothing) unless the rows hold exactly those ids, once each. Ids that would break
    a CSV line (a comma, quote or line break, e.g. from a file name) are refused too."""
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "x", newline="") as file:
            file.write(f"{IMAGE_ID},{ENCODED_PIXELS}\n")
            file.writelines(f"{image_id},{encoded}\n" for image_id, encoded in rows)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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


def submission_items(dicom_dir, sample_submission=None) -> list[tuple[str, str | None]]:
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


def predict_submission(
    inference: Inference,
    items: Sequence[tuple[str, str | None]],
    out,
    postprocess: PostProcess = PostProcess(),
    expected_ids: Sequence[str] | None = None,
    overlays=None,
) -> PredictSummary:
    """Predicts every item (see `submission_items`), writes the submission to `out` and, given an
    `overlays.OverlayWriter`, the overlays of its selected images."""
    start = time.perf_counter()
    first_batch = min(inference.predictor.batch_size, len(items))
    first_batch_s = 0.0
    rows, unreadable = {}, []
    for count, prediction in enumerate(inference.predictions(items), start=1):
        if count == first_batch:
            first_batch_s = time.perf_counter() - start
        image = prediction.image
        mask = prediction.mask(postprocess)
        if mask is None:
            unreadable.append(image.image_id)
            rows[image.image_id] = rle.EMPTY
            continue
        rows[image.image_id] = rle.encode(mask)
        if overlays is not None and overlays.selected(image.index):
            overlays.add(image.index, image.image_id, image.pixels, mask)
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


# ---------------------------------------------------------------------------------------------------- command line


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and inference flags that `predict`, `tune` and `evaluate` share."""
    parser.add_argument("--checkpoint", required=True, help="training workdir or converted model directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="this saved step (default: the latest)")
    which.add_argument("--best", action="store_true", help="the step with the best class-gated validation Dice")
    which.add_argument("--average-top", type=int, default=0, metavar="K",
                       help="average the parameters of the K best steps")
    parser.add_argument("--image-size", type=int,
                        help="model input size (default: the checkpoint's config.data.image_size)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per batch over all devices, rounded up to a multiple of the device count (8)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                        help="horizontal-flip test-time augmentation (on)")
    parser.add_argument("--workers", type=int, default=2, help="threads decoding DICOMs (2)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="empty",
                        help="a missing or unreadable DICOM: predict it empty with a warning, or fail (empty)")


def load_inference(args: argparse.Namespace) -> tuple[Inference, object]:
    """(Inference, config) for the checkpoint and options that the flags of `add_model_arguments` name."""
    from siim_jax.checkpoints import restore_for_inference

    model, config = restore_for_inference(args.checkpoint, step=args.step, best=args.best,
                                          average_top=args.average_top)
    image_size = args.image_size
    if image_size is None:
        if "data" not in config:
            raise SystemExit(f"{args.checkpoint} holds no data config: pass --image-size")
        image_size = int(config.data.image_size)
    preprocess = functools.partial(validation_preprocess, image_size=image_size)
    predictor = Predictor(model, args.batch_size, args.tta)
    return Inference(predictor, preprocess, args.on_error, args.workers), config


def overlay_sample(n_images: int, count: int, seed: int = 0) -> set[int] | None:
    """Indices of the images to draw: all (None) when count is 0, else a seeded sample of `count`."""
    if count <= 0 or count >= n_images:
        return None
    return set(np.random.default_rng(seed).choice(n_images, size=count, replace=False).tolist())


def add_overlay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overlays", type=Path, metavar="DIR", help="write PNGs of the contours into DIR")
    parser.add_argument("--overlay-count", type=int, default=0, metavar="N",
                        help="draw a seeded sample of N images (default 0: every image)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="folder of test DICOMs (searched recursively)")
    parser.add_argument("--out", required=True, type=Path, help="submission CSV to write")
    parser.add_argument("--sample-submission", type=Path,
                        help="predict exactly its ImageIds and refuse to write a file that misses any")
    parser.add_argument("--postprocess", type=Path, metavar="JSON",
                        help="post-processing from `siim-jax tune` (default: threshold 0.5)")
    add_overlay_arguments(parser)


def run(args: argparse.Namespace) -> int:
    postprocess = PostProcess.from_json(args.postprocess) if args.postprocess else PostProcess()
    items = submission_items(args.data, args.sample_submission)
    inference, _ = load_inference(args)
    overlays = None
    if args.overlays:
        overlays = OverlayWriter(args.overlays, sample=overlay_sample(len(items), args.overlay_count))
    expected = [image_id for image_id, _ in items] if args.sample_submission else None
    summary = predict_submission(inference, items, args.out, postprocess, expected, overlays)
    print(summary.report())
    print(f"wrote {args.out}" + (f" and {len(overlays.written)} overlays in {args.overlays}" if overlays else ""))
    return 0
