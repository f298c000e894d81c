"""Checkpoint → probabilities: the jitted, sharded model and the pipelined `Inference` that `predict`, `tune`,
`evaluate` and ensembles share.

In Python, `Inference.from_checkpoint(path, best=True).predictions(items)` gives the predictions that
`siim-jax predict` turns into a submission (siim_jax.inference.submission).

Images are read through the grain pipeline that validates during training (`pipeline.test_batches`: decoded and
resized as validation images are, with each image's original size), batched at a fixed size, handed to the
devices as uint8 and normalised by one jitted function sharded along the batch over all devices, with
horizontal-flip TTA. The stages overlap: the pipeline's workers decode the next batches and two batches are on the
devices at a time. A missing or unreadable DICOM comes without probabilities and with a warning naming it
(`on_error='empty'`, the default) or stops the run (`on_error='fail'`).

Compiled functions can be kept in a persistent cache (`use_compilation_cache`; `default_compilation_cache()` is
`$XDG_CACHE_HOME/siim-jax/jax`, else `~/.cache/siim-jax/jax`), so a second run with the same model and batch does
not compile again.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
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
from siim_jax.data import pipeline
from siim_jax.data.augment import model_input
from siim_jax.data.dicom import DicomError, read_dicom
from siim_jax.inference.postprocess import PostProcess
from siim_jax.models import build_unfilled

ON_ERROR = ("empty", "fail")
DTYPES = ("float32", "bfloat16")
IN_FLIGHT = 2  # batches dispatched to the devices and not yet fetched
Item = tuple[str, str | None]  # (ImageId, DICOM path or None when no file has that id)


class UnreadableImageWarning(UserWarning):
    """A test image that could not be read and is predicted empty."""



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
        average_last: int = 0,
        bn_statistics: str = "average",
        image_size: int | None = None,
        batch_size: int = 8,
        tta: bool = True,
        workers: int | str = 0,
        on_error: str = "empty",
        progress: bool = True,
        dtype: str | None = None,
    ) -> Inference:
        """The model of a training run (latest `step`, `best`, or the `average_top` best or `average_last` latest
        steps averaged, their BatchNorm statistics averaged or `bn_statistics='recompute'`d; see
        training.checkpoints.restore_for_inference) or of a
        model directory, at `image_size` (default: the training config's `data.image_size`), computing in `dtype`
        (default: the checkpoint's `model.dtype`; parameters stay float32)."""
        from siim_jax.training.checkpoints import restore_for_inference

        model, config = restore_for_inference(
            path, step=step, best=best, average_top=average_top, average_last=average_last,
            bn_statistics=bn_statistics,
        )
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
