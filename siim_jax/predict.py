"""Checkpoint → probabilities → masks → submission, and the inference core that `tune` and `evaluate` share.

    siim-jax predict --checkpoint DIR [--step N | --best | --average-top K] --data DICOM_DIR --out submission.csv

In Python, `Inference.from_checkpoint(path, best=True).predictions(items)` gives the same predictions.
A repeated `--checkpoint`, or `--ensemble JSON`, predicts with an `ensemble.Ensemble` of models instead.

Images are read through the grain pipeline that validates during training (`pipeline.test_batches`: decoded and
resized as validation images are, with each image's original size), batched at a fixed size, handed to the
devices as uint8 and normalised by one jitted function sharded along the batch over all devices, with
horizontal-flip TTA. The stages overlap: the pipeline's workers decode the next batches, two batches are on the
devices at a time, and a pool of threads resizes the probabilities back to each image's original size
(bilinear, in float), post-processes them and encodes them in the challenge's relative RLE.
The submission has exactly one row per image, `-1` for empty ones, and appears atomically, synced to disk. A
missing or unreadable DICOM becomes a `-1` row and a warning naming it (`--on-error empty`, the default) or stops
the run (`--on-error fail`).

Compiled functions are kept in a persistent cache (`--compilation-cache DIR`, default
`$XDG_CACHE_HOME/siim-jax/jax`, else `~/.cache/siim-jax/jax`; `--no-compilation-cache` turns it off), so a
second run with the same model and batch does not compile again.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from flax import nnx
from tqdm.auto import tqdm

from siim_jax import sharding as sharding_lib
from siim_jax.data import pipeline, rle
from siim_jax.data.augment import model_input
from siim_jax.data.dicom import DicomError, read_dicom
from siim_jax.data.labels import ENCODED_PIXELS, IMAGE_ID, find_dicoms, read_image_ids
from siim_jax.models import build_unfilled
from siim_jax.overlays import OverlayWriter
from siim_jax.postprocess import PostProcess

ON_ERROR = ("empty", "fail")
DTYPES = ("float32", "bfloat16")
IN_FLIGHT = 2  # batches dispatched to the devices and not yet fetched
POSTPROCESS_THREADS = max(1, min(len(os.sched_getaffinity(0)), 4))  # resize, post-process and RLE, beside decoding
Item = tuple[str, str | None]  # (ImageId, DICOM path or None when no file has that id)


class UnreadableImageWarning(UserWarning):
    """A test image that could not be read and is predicted empty."""


class SubmissionError(ValueError):
    """A submission that would not match the expected ImageIds; nothing is written."""


# ---------------------------------------------------------------------------------------------------- device side


def predict_probabilities(model: nnx.Module, images: jax.Array, tta_hflip: bool = True):
    """Mask probabilities (N, H, W) float32 and class probabilities (N,) (None without a class head).

    With `tta_hflip`, sigmoid outputs on the images and on their mirror images (mirrored back) are averaged.
    Images are uint8 grey (N, H, W) as the pipeline gives them, or float NHWC as the model takes them
    (`augment.model_input`).
    """
    images = model_input(images)
    if tta_hflip:
        images = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
    mask_logits, class_logits = model(images, train=False)
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
    """`predict_probabilities` jitted once for a fixed batch (of uint8 grey or float NHWC images), sharded along the
    batch over all devices.

    The batch size is rounded up to a multiple of the device count; shorter batches are zero-padded, so every
    call reuses the one compiled function. `dispatch` returns at once (JAX runs asynchronously) and `fetch`
    brings the results of a dispatched batch to the host, so the host can prepare the next batch meanwhile.
    """

    def __init__(self, model: nnx.Module, batch_size: int = 8, tta_hflip: bool = True):
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
        if count < self.batch_size:
            padded = np.zeros((self.batch_size, *images.shape[1:]), images.dtype)
            padded[:count] = images
            images = padded
        return self._forward(self._state, jax.device_put(images, self._batch_sharding)), count

    @staticmethod
    def fetch(dispatched) -> tuple[np.ndarray, np.ndarray | None]:
        (probs, class_probs), count = dispatched
        probs, class_probs = jax.device_get((probs, class_probs))
        return probs[:count], None if class_probs is None else class_probs[:count]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.fetch(self.dispatch(images))


# ---------------------------------------------------------------------------------------------------- host side


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The model's output for one image at the model's resolution; `prob` is None when the image was unreadable."""

    index: int  # position among the predicted items
    image_id: str
    path: str | None
    prob: np.ndarray | None
    class_prob: float | None
    original_size: tuple[int, int] | None  # (height, width); None when unreadable

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

    def pixels(self) -> np.ndarray:
        """The radiograph at its original size, read again (for overlays; the pipeline keeps only the model input)."""
        return read_dicom(self.path).pixels


def unreadable_reason(image_id: str, path: str | None) -> DicomError:
    """Why an image the pipeline marked invalid could not be read: reading it again raises the reason."""
    if path is None:
        return DicomError(f"<{image_id}.dcm>", "no DICOM file with this ImageId in the data folder")
    try:
        read_dicom(path)
    except DicomError as error:
        return error
    return DicomError(path, "could not be decoded in the input pipeline")


@dataclasses.dataclass
class Inference:
    """A jitted model and how images reach it: what `predict`, `tune`, `evaluate` and the demo run.

    Images are read by `pipeline.test_batches` at `image_size` by `workers` grain processes (0: a background
    thread; 'auto': see `pipeline.worker_count`). `config` is the checkpoint's config (the training run's, or
    {'model': ...} for a model directory).
    """

    predictor: Predictor
    image_size: int
    on_error: str = "empty"
    workers: int | str = 0
    progress: bool = True
    config: ml_collections.ConfigDict | None = None

    @property
    def batch_size(self) -> int:
        return self.predictor.batch_size

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        step: int | None = None,
        best: bool = False,
        average_top: int = 0,
        image_size: int | None = None,
        batch_size: int = 8,
        tta: bool = True,
        workers: int | str = 0,
        on_error: str = "empty",
        progress: bool = True,
        dtype: str | None = None,
    ) -> Inference:
        """The model of a training run (latest `step`, `best`, or `average_top` best steps averaged) or of a
        model directory, at `image_size` (default: the training config's `data.image_size`), computing in `dtype`
        (default: the checkpoint's `model.dtype`; parameters stay float32)."""
        from siim_jax.checkpoints import restore_for_inference

        model, config = restore_for_inference(path, step=step, best=best, average_top=average_top)
        if dtype is not None and dtype != config.model.dtype:
            model = with_compute_dtype(model, config.model, dtype)
        image_size = checkpoint_image_size(path, config, image_size)
        return cls(Predictor(model, batch_size, tta), image_size, on_error, workers, progress, config)

    def predictions(self, items: Sequence[Item], desc: str = "predict") -> Iterator[Prediction]:
        """Predictions of (ImageId, path or None) items, in order, under a progress bar of the images whose
        results have reached the host. Unreadable ones warn and come without probabilities (`on_error='empty'`)
        or raise `DicomError` (`on_error='fail'`)."""
        found = [(image_id, path) for image_id, path in items if path is not None]
        outputs = self._outputs(found) if found else iter(())
        with tqdm(total=len(items), desc=desc, unit="img", disable=not self.progress) as bar:
            for index, (image_id, path) in enumerate(items):
                prob, class_prob, original_size = next(outputs) if path is not None else (None, None, None)
                if prob is None:
                    self._unreadable(image_id, path)
                yield Prediction(index, image_id, path, prob, class_prob, original_size)
                bar.update()

    def _unreadable(self, image_id: str, path: str | None) -> None:
        error = unreadable_reason(image_id, path)
        if self.on_error == "fail":
            raise error
        warnings.warn(f"ImageId {image_id} predicted empty: {error}", UnreadableImageWarning, 3)

    def _outputs(self, found: list[Item]) -> Iterator[tuple]:
        """(prob, class prob, original size) of each item in order, all None for an unreadable file. IN_FLIGHT
        batches are on the devices at a time: the oldest is fetched while the next one runs, and the pipeline
        reads the ones after in the background."""
        data_config = ml_collections.ConfigDict(
            {"image_size": self.image_size, "prepared_dir": "", "workers": self.workers, "prefetch": 2}
        )
        frame = pd.DataFrame(found, columns=["image_id", "path"]).assign(rles=[()] * len(found))
        batches = pipeline.test_batches(data_config, frame, self.predictor.batch_size, process_index=0, process_count=1)
        in_flight = collections.deque()
        with contextlib.closing(batches):  # stops the worker processes and frees their shared memory
            for batch in batches:
                if len(in_flight) == IN_FLIGHT:
                    yield from self._unbatch(*in_flight.popleft())
                in_flight.append((batch, self.predictor.dispatch(batch["image"])))
        while in_flight:
            yield from self._unbatch(*in_flight.popleft())

    def _unbatch(self, batch: dict, dispatched) -> Iterator[tuple]:
        probs, class_probs = self.predictor.fetch(dispatched)
        for row in np.flatnonzero(batch["index"] >= 0):
            if not batch["valid"][row]:
                yield None, None, None
                continue
            class_prob = None if class_probs is None else float(class_probs[row])
            yield probs[row], class_prob, tuple(int(size) for size in batch["original_size"][row])


def checkpoint_image_size(path: str | Path, config: ml_collections.ConfigDict, image_size: int | None) -> int:
    """`image_size`, or by default the training config's `data.image_size` (a model directory has none)."""
    if image_size is not None:
        return image_size
    if "data" not in config:
        raise ValueError(f"{path} holds no data config: give the image size")
    return int(config.data.image_size)


def with_compute_dtype(model: nnx.Module, model_config: ml_collections.ConfigDict, dtype: str) -> nnx.Module:
    """The same weights in a model that computes in `dtype` (its parameters and BatchNorm statistics unchanged)."""
    twin_config = model_config.copy_and_resolve_references()
    twin_config.dtype = dtype
    twin = build_unfilled(twin_config)
    nnx.update(twin, nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    return twin


def default_compilation_cache() -> Path:
    """$XDG_CACHE_HOME/siim-jax/jax, or ~/.cache/siim-jax/jax."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "siim-jax" / "jax"


def use_compilation_cache(directory: str | Path | None) -> None:
    """Keeps every compiled function in `directory` (None: no persistent cache), so that a later process with the
    same model, shapes and JAX version loads it instead of compiling. Call it before anything is compiled."""
    if directory is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # CPU compiles are short, and still add up


# ---------------------------------------------------------------------------------------------------- submission


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "x", newline="") as file:
            file.write(f"{IMAGE_ID},{ENCODED_PIXELS}\n")
            file.writelines(f"{image_id},{encoded}\n" for image_id, encoded in rows)
            file.flush()
            os.fsync(file.fileno())
        _sync_folder(path.parent)
        os.replace(temporary, path)
        _sync_folder(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that the names created or renamed in it are on disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
) -> PredictSummary:
    """Predicts every item (see `submission_items`) with an `Inference` or an `ensemble.Ensemble`, writes the
    submission to `out` and, given an `OverlayWriter`, the overlays of its selected images. Post-processing and
    RLE encoding run on POSTPROCESS_THREADS threads while the next predictions arrive."""
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


# ---------------------------------------------------------------------------------------------------- command line


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and inference flags that `predict`, `tune` and `evaluate` share."""
    parser.add_argument("--checkpoint", action="append", type=Path,
                        help="training workdir or converted model directory; repeated: an ensemble of them, "
                             "each with the options below")
    parser.add_argument("--ensemble", type=Path, metavar="JSON",
                        help="an ensemble file listing members with their own options (see siim_jax.ensemble)")
    add_weights_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per batch over all devices, rounded up to a multiple of the device count (8)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                        help="horizontal-flip test-time augmentation (on)")
    parser.add_argument("--workers", type=_workers, default="auto",
                        help="processes decoding DICOMs: a count (0: one background thread) or 'auto' (default: "
                             f"the cores this process may use less one, at most {pipeline.MAX_AUTO_WORKERS})")
    parser.add_argument("--on-error", choices=ON_ERROR, default="empty",
                        help="a missing or unreadable DICOM: predict it empty with a warning, or fail (empty)")
    parser.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: the checkpoint's model.dtype)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--compilation-cache", type=Path, default=default_compilation_cache(), metavar="DIR",
                       help="persistent cache of compiled functions (default: %(default)s)")
    cache.add_argument("--no-compilation-cache", dest="compilation_cache", action="store_const", const=None,
                       help="compile afresh and keep nothing")


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """Which saved weights of a training run, and the input size: the flags `predict` and `export` share."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="this saved step (default: the latest)")
    which.add_argument("--best", action="store_true", help="the step with the best class-gated validation Dice")
    which.add_argument("--average-top", type=int, default=0, metavar="K",
                       help="average the parameters of the K best steps")
    parser.add_argument("--image-size", type=int,
                        help="model input size (default: the checkpoint's config.data.image_size)")


def _workers(text: str) -> int | str:
    return text if text == "auto" else int(text)


def inference_from_args(args: argparse.Namespace):
    """The `Inference` (one --checkpoint) or `ensemble.Ensemble` (several, or --ensemble) the flags of
    `add_model_arguments` name, compiling through the persistent cache they name; either offers
    `.predictions(items)` and `.config`."""
    from siim_jax import ensemble

    use_compilation_cache(args.compilation_cache)
    checkpoints = args.checkpoint or []
    if bool(checkpoints) == bool(args.ensemble):
        raise SystemExit("give --checkpoint (once, or repeated for an ensemble) or --ensemble, not both")
    try:
        if len(checkpoints) == 1:
            return Inference.from_checkpoint(
                checkpoints[0], step=args.step, best=args.best, average_top=args.average_top,
                image_size=args.image_size, batch_size=args.batch_size, tta=args.tta, workers=args.workers,
                on_error=args.on_error, dtype=args.dtype,
            )
        if args.ensemble:
            members = ensemble.read_ensemble_file(args.ensemble)
        else:
            members = [ensemble.Member(path, step=args.step, best=args.best, average_top=args.average_top,
                                       image_size=args.image_size, tta=args.tta) for path in checkpoints]
        return ensemble.Ensemble(members, args.batch_size, args.workers, args.on_error, dtype=args.dtype)
    except ValueError as error:
        raise SystemExit(str(error)) from error


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
    inference = inference_from_args(args)
    overlays = None
    if args.overlays:
        overlays = OverlayWriter(args.overlays, sample=overlay_sample(len(items), args.overlay_count))
    expected = [image_id for image_id, _ in items] if args.sample_submission else None
    summary = predict_submission(inference, items, args.out, postprocess, expected, overlays)
    print(summary.report())
    print(f"wrote {args.out}" + (f" and {len(overlays.written)} overlays in {args.overlays}" if overlays else ""))
    return 0
