"""Grain datasets for training, validation and prediction.

Config (``config.data``, from ``siim_jax.configs.defaults.default_data_config()``):
  root            the challenge tree: dicom-images-train/, train-rle.csv, dicom-images-test/
  labels_csv      label file; '' means root/train-rle.csv
  prepared_dir    '' decodes DICOMs on the fly; else the ``siim-jax prepare --out`` folder (root is then unused)
  image_size      training size in pixels (512)
  fold, n_folds, fold_seed    validation fold (0) of n_folds (5) patient-grouped stratified folds drawn with
                  fold_seed (0): the same folds on the fly and prepared
  strict          False (default): a labelled image with a malformed RLE row, or whose DICOM header shows it
                  cannot be decoded (see ``dicom.read_header``), is left out and listed in ``Splits.skipped``;
                  True: the first one stops ``build_datasets`` with an error naming the file and the reason
  balance.mode    'difference' (every positive, negatives up to max_difference more: 1000, the seed's way),
                  'fraction' (every positive, negatives so positives make positive_fraction of the epoch), 'none'
  balance.positive_fraction   a float, or a schedule ((0, 0.8), (10, 0.6), (20, 0.4)): from epoch 0 use 0.8, ...
  augment.*       the train pipeline's knobs, see ``defaults.default_augment_config``
  workers         'auto' (default): the cores this process may use less one, at most 8 (`worker_count`); 0 loads
                  in the calling process (one background thread); N > 0 uses N worker processes
  prefetch        batches each worker (or the background thread) keeps ready (2)
  batch_timeout_s training stops with an error naming the stage that waits when no batch comes for this long
                  (300; 0: wait for ever), see ``siim_jax.training.feed``
  seed            seeds each epoch's draw, from (seed, epoch), and each element's augmentation, from
                  (seed, epoch, position in the epoch)

API:
  build_datasets(config.data) -> Splits(train, val, test, report, skipped): index frames, one row per image, positional
      (RangeIndex): image_id, rles, positive, area, patient_id, fold, and 'path' (on the fly) or 'split' and
      'record' (prepared); the test frame also has height and width (original size). `skipped` lists the
      labelled images left out (``labels.skipped_frame``: image_id, path, reason); ``write_skipped`` saves it.
  steps_per_epoch(config.data, frame, epoch, global_batch_size): full global batches in that epoch's draw
  epoch_sample(positive, epoch, config.data.balance, seed), positive_fraction_at(schedule, epoch): the draw
  train_iterator(config.data, frame, epochs, global_batch_size, process_index=None, process_count=None,
      sharding=None, skipped_csv=None, progress=None, start_batch=0) -> one grain DatasetIterator over the
      per-process batches of every epoch in `epochs` (e.g. range(config.train.epochs): a whole run), in turn
      (global_batch_size // process_count rows each; process defaults from jax), from `start_batch` on. Batch b
      of an epoch is the same global batch for any process or worker count, and whichever epochs come before it.
  eval_batches(config.data, frame, global_batch_size, process_index=None, process_count=None, sharding=None,
      skipped_csv=None): every row exactly once, in order, ceil(len(frame) / global_batch_size) batches, padding
      rows invalid.
  test_batches(...): as eval_batches, without 'mask' and 'positive'.
  to_device(batch, sharding): a host batch -> global jax arrays (jax.make_array_from_process_local_data).
  The iterators take ``sharding`` (e.g. NamedSharding(mesh, P('data'))) to hand out batches already on the mesh,
  two ahead; worker processes (``workers``) start together, and run with one OpenCV thread each and JAX on the
  CPU only. ``progress`` (a PipelineProgress) counts the batches loaded and transferred, for
  ``siim_jax.training.feed.InputMonitor`` to name the stage a stalled run waits on.

Batches are dicts of NumPy arrays (of jax arrays on the mesh, prefetched, when ``sharding`` is given):
  'image' uint8 (B, H, W) grey; 'mask' uint8 (B, H, W) in {0, 1}: the jitted functions turn them into the model's
  float32 input and mask (``augment.model_input`` / ``model_mask``), so the host hands the device 2 bytes a pixel;
  'positive' float32 (B,); 'valid' bool (B,): False for padding rows and for files that cannot be decoded (blank
  image and mask, positive 0, logged, and added to ``skipped_csv`` when the iterator was given one); 'index' int32
  (B,): row in the frame, -1 for padding; 'original_size' int32 (B, 2): the image's (height, width) before
  resizing, for mapping predictions back (0, 0 where not read). Training batches replace a file that cannot be
  decoded by the next decodable image of the same class (its 'index' says which), so they stay all valid.

Checkpointing: the iterators are grain DatasetIterators; save with ``grain.checkpoint.CheckpointSave(it)``
(orbax, e.g. inside ``ocp.args.Composite``) or ``it.get_state()``, and restore into a fresh
``train_iterator`` of the same epochs with ``CheckpointRestore(it)`` / ``it.set_state(state)``: it continues
with exactly the next batch, under any ``workers`` setting (the state is the number of batches handed out).
``train_iterator(..., start_batch=n)`` starts there directly, without loading the batches before it.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import grain
import jax
import ml_collections
import numpy as np
import pandas as pd
import pydicom
from absl import flags

from siim_jax.data import layout, rle
from siim_jax.data.augment import TrainAugment
from siim_jax.data.decode import decode_example
from siim_jax.data.dicom import DicomError
from siim_jax.data.labels import SKIPPED_COLUMNS, assign_folds, build_index, skipped_frame

_SAMPLE_STREAM, _AUGMENT_STREAM = 1, 2  # second entropy word: epoch draws and augmentations never share a stream
_DEVICE_PREFETCH = 2
_STAND_IN_TRIES = 16  # rows tried in place of a training file that fails to decode
MAX_AUTO_WORKERS = 8  # 'auto' workers: enough to feed one accelerator at 512² from a prepared cache

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ index


@dataclasses.dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    report: str
    skipped: pd.DataFrame = dataclasses.field(default_factory=skipped_frame)


def write_skipped(path, skipped: pd.DataFrame) -> None:
    """Starts a skipped.csv (image_id, path, reason) with the images the index left out."""
    try:
        skipped.to_csv(path, index=False, columns=SKIPPED_COLUMNS)
    except OSError as error:  # a full disk reports no file name by itself
        raise OSError(error.errno, error.strerror, str(path)) from error


def _add_skipped(path, image_id: str, file: str, reason: str) -> None:
    """Adds a file that failed to decode to a skipped.csv, once. A single O_APPEND write, so that worker
    processes can share the file."""
    if os.path.exists(path) and file in set(pd.read_csv(path, dtype=str, keep_default_na=False)["path"]):
        return
    line = io.StringIO()
    if not os.path.exists(path):
        csv.writer(line).writerow(SKIPPED_COLUMNS)
    csv.writer(line).writerow([image_id, file, reason])
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line.getvalue().encode())
    finally:
        os.close(descriptor)


def _original_sizes(paths) -> list[tuple[int, int]]:
    """(Rows, Columns) from each header; (0, 0) where the header cannot be read (the pixels will not be either)."""
    sizes = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            sizes.append((int(ds.Rows), int(ds.Columns)))
        except Exception:  # noqa: BLE001 - reported when the pixels are read
            sizes.append((0, 0))
    return sizes


def _dicom_test_frame(test_dir: Path) -> pd.DataFrame:
    if not test_dir.is_dir():
        return pd.DataFrame(columns=["image_id", "path", "rles", "positive", "area", "fold", "height", "width"])
    frame = build_index(test_dir).frame
    sizes = np.array(_original_sizes(frame["path"]), np.int64).reshape(-1, 2)
    return frame.assign(height=sizes[:, 0], width=sizes[:, 1])


def build_datasets(config: ml_collections.ConfigDict) -> Splits:
    """Index frames of the training folds, the validation fold and the test images."""
    if config.prepared_dir:
        from siim_jax.data import tfds_siim  # TFDS only for a prepared cache: on-the-fly training never imports it

        builder = tfds_siim.load_prepared(config.prepared_dir, config.image_size)
        labelled = tfds_siim.index_frame(builder, "train")
        groups = labelled["patient_id"].fillna(labelled["image_id"]).to_numpy()
        labelled["fold"] = assign_folds(labelled["positive"].to_numpy(bool), groups, config.n_folds, config.fold_seed)
        labelled = labelled[labelled["record"] >= 0]  # folds first, so a skipped file moves no other image
        test = tfds_siim.index_frame(builder, "test") if "test" in builder.info.splits else labelled.iloc[:0]
        test = test[test["record"] >= 0].assign(fold=-1)
        report = tfds_siim.report(builder)
        skipped = skipped_frame(
            (item["image_id"], config.prepared_dir, item["reason"])
            for item in builder.info.metadata["skipped"]
            if item["split"] == "train"
        )
    else:
        root = Path(config.root)
        labels_csv = config.labels_csv or root / layout.TRAIN_CSV
        index = build_index(
            root / layout.TRAIN_DIR, labels_csv, config.n_folds, config.fold_seed, strict=config.strict
        )
        labelled, report, skipped = index.frame, index.report(), index.skipped
        test = _dicom_test_frame(root / layout.TEST_DIR)
    validation = labelled["fold"] == config.fold
    return Splits(
        train=labelled[~validation].reset_index(drop=True),
        val=labelled[validation].reset_index(drop=True),
        test=test.reset_index(drop=True),
        report=report,
        skipped=skipped,
    )


# ------------------------------------------------------------------------------------------------------ epochs


def positive_fraction_at(schedule, epoch: int) -> float:
    """The fraction in force at `epoch`: a float, or the last (start_epoch, fraction) pair with start <= epoch."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    started = [fraction for start, fraction in sorted(schedule) if start <= epoch]
    if not started:
        raise ValueError(f"positive_fraction schedule {schedule} has no value for epoch {epoch}")
    return float(started[-1])


def _negatives_to_draw(n_positive: int, n_negative: int, epoch: int, balance) -> int:
    if balance.mode == "none":
        return n_negative
    if balance.mode == "difference":
        wanted = n_positive + balance.max_difference
    elif balance.mode == "fraction":
        fraction = positive_fraction_at(balance.positive_fraction, epoch)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"positive fraction must lie in (0, 1], got {fraction} at epoch {epoch}")
        wanted = round(n_positive * (1.0 - fraction) / fraction)
    else:
        raise ValueError(f"balance.mode must be 'difference', 'fraction' or 'none', got {balance.mode!r}")
    return min(n_negative, wanted)


def epoch_sample(positive: np.ndarray, epoch: int, balance, seed: int) -> np.ndarray:
    """Frame rows of one epoch in training order: every positive and a fresh seeded draw of negatives (all of
    them when there are too few for the balance asked). The same (seed, epoch) gives the same rows."""
    positive = np.asarray(positive, bool)
    positives, negatives = np.flatnonzero(positive), np.flatnonzero(~positive)
    rng = np.random.default_rng([seed, _SAMPLE_STREAM, epoch])
    count = _negatives_to_draw(len(positives), len(negatives), epoch, balance)
    drawn = rng.choice(negatives, size=count, replace=False)
    return rng.permutation(np.concatenate([positives, drawn]))


def steps_per_epoch(config: ml_collections.ConfigDict, frame: pd.DataFrame, epoch: int, global_batch_size: int) -> int:
    """Full global batches in the epoch (the remainder of the draw is left out)."""
    return len(epoch_sample(frame["positive"].to_numpy(bool), epoch, config.balance, config.seed)) // global_batch_size


# ------------------------------------------------------------------------------------------------------ sources


class DicomSource:
    """Decodes DICOM files and masks on the fly, resized to the training size; lists failures in `skipped_csv`."""

    def __init__(self, frame: pd.DataFrame, image_size: int, skipped_csv=None):
        self._image_ids = list(frame["image_id"])
        self._paths = list(frame["path"])
        self._rles = list(frame["rles"])
        self._image_size = image_size
        self._skipped_csv = skipped_csv

    def load(self, row: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
        """(image, mask, original size), or None when the file cannot be decoded."""
        try:
            decoded = decode_example(self._paths[row], self._rles[row], self._image_size)
        except (DicomError, rle.RLEError) as exc:
            log.warning("unreadable, left out: %s", exc)
            if self._skipped_csv is not None:
                reason = exc.reason if isinstance(exc, DicomError) else str(exc)
                _add_skipped(self._skipped_csv, self._image_ids[row], self._paths[row], reason)
            return None
        return decoded.image, decoded.mask, decoded.original_size


class PreparedSource:
    """Reads images and masks already at the training size from the prepared array_record files."""

    def __init__(self, frame: pd.DataFrame, prepared_dir: str, image_size: int):
        splits = frame["split"].unique()
        if len(splits) > 1:
            raise ValueError(f"a frame mixes prepared splits {list(splits)}")
        from siim_jax.data import tfds_siim  # see build_datasets

        builder = tfds_siim.load_prepared(prepared_dir, image_size)
        self._records = frame["record"].to_numpy(np.int64)
        self._data = builder.as_data_source(split=splits[0]) if len(splits) else None

    def load(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        example = self._data[int(self._records[row])]
        return example["image"], example["mask"], example["original_size"]


def _source(config: ml_collections.ConfigDict, frame: pd.DataFrame, skipped_csv=None) -> DicomSource | PreparedSource:
    if config.prepared_dir:
        return PreparedSource(frame, config.prepared_dir, config.image_size)
    return DicomSource(frame, config.image_size, skipped_csv)


# ------------------------------------------------------------------------------------------------------ elements


@dataclasses.dataclass
class _LoadElement(grain.transforms.Map):
    """(frame row, position in the epoch[, epoch when augmenting]) -> one element; row -1 is a padding row."""

    source: DicomSource | PreparedSource
    positive: np.ndarray
    image_size: int
    labelled: bool
    augment: TrainAugment | None = None
    seed: int = 0
    replace_failures: bool = False  # training: stand in the next decodable row of the same class

    def map(self, item: np.ndarray) -> dict[str, np.ndarray]:
        row, position = int(item[0]), int(item[1])
        loaded = self.source.load(row) if row >= 0 else None
        if loaded is None and row >= 0 and self.replace_failures:
            row, loaded = self._same_class_stand_in(row)
        if loaded is None:
            blank = np.zeros((self.image_size, self.image_size), np.uint8)
            image, mask, original_size = blank, blank, (0, 0)
        else:
            image, mask, original_size = loaded
            if self.augment is not None:
                rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, int(item[2]), position])
                image, mask = self.augment(image, mask, rng)
        element = {
            "image": image,
            "valid": np.bool_(loaded is not None),
            "index": np.int32(row),
            "original_size": np.asarray(original_size, np.int32),
        }
        if self.labelled:
            element["mask"] = mask
            element["positive"] = np.float32(self.positive[row] if loaded is not None else 0.0)  # as the mask
        return element

    def _same_class_stand_in(self, row: int) -> tuple[int, tuple | None]:
        """The first decodable row after `row` (cyclically) with the same label, so that a file that fails to
        decode never enters training as a blank image labelled negative; (row, None) when none of the next
        _STAND_IN_TRIES does."""
        same_class = np.flatnonzero(self.positive == self.positive[row])
        following = np.roll(same_class, -int(np.searchsorted(same_class, row)) - 1)
        for candidate in following[:_STAND_IN_TRIES]:
            loaded = self.source.load(int(candidate))
            if loaded is not None:
                return int(candidate), loaded
        return row, None


def _collate(elements: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks elements. Images and masks stay uint8: the jitted steps normalise them (`augment.model_input`)."""
    return {key: np.stack([element[key] for element in elements]) for key in elements[0]}


def _process_plan(rows: np.ndarray, global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's (row, global position) pairs: its contiguous share of every global batch."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} does not split over {process_count} processes")
    positions = np.arange(len(rows)).reshape(-1, process_count, global_batch_size // process_count)
    positions = positions[:, process_index].reshape(-1)
    return np.stack([rows[positions], positions], axis=1)


# ------------------------------------------------------------------------------------------------------ iterators


def _init_worker(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    cv2.setNumThreads(1)  # the worker processes already fill the cores
    # albumentations imports torch when it can (2.5 of a worker's 5 CPU-seconds of start-up, measured); nothing
    # here needs it, and a None entry makes its import fail, which albumentations expects
    sys.modules.setdefault("torch", None)
    # grain imports jax in every worker; nothing there needs a device, and a worker that initialised the GPU
    # backend would claim memory the training process holds (XLA_PYTHON_CLIENT_MEM_FRACTION is inherited)
    jax.config.update("jax_platforms", "cpu")


def _this_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    return (
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
    )


def to_device(batch: dict[str, np.ndarray], sharding) -> dict:
    """Puts this process's rows of a global batch on the mesh as global arrays split along the batch axis."""
    return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(sharding, rows), batch)


class PipelineProgress:
    """Counts the batches that came out of the workers (or the loading thread) and those whose device transfer
    finished, so that a consumer kept waiting can name the stage it waits on (`siim_jax.training.feed`)."""

    def __init__(self):
        self.workers = 0  # worker processes; 0: loading in a thread of this process
        self.loaded = 0
        self.transferred = 0
        self._lock = threading.Lock()

    def restart(self, workers: int) -> None:
        """Counts afresh, for a new iterator (one resumed at another position) with `workers` processes."""
        with self._lock:
            self.workers, self.loaded, self.transferred = workers, 0, 0

    def mark_loaded(self, batch):
        with self._lock:
            self.loaded += 1
        return batch

    def mark_transferred(self, batch):
        with self._lock:
            self.transferred += 1
        return batch


def _transfer(batch: dict[str, np.ndarray], sharding, progress: PipelineProgress | None) -> dict:
    """`to_device` in the prefetch thread, waiting there until the copy is done (the step does not wait for it),
    so that a transfer that never ends shows as one."""
    if progress is not None:
        progress.mark_loaded(batch)
    batch = jax.block_until_ready(to_device(batch, sharding))
    return batch if progress is None else progress.mark_transferred(batch)


def worker_count(workers: int | str) -> int:
    """Worker processes for a `workers` setting: N as given, or for 'auto' the cores this process may use less one
    (for the main process, which feeds the devices), at most MAX_AUTO_WORKERS; 0 means loading in-process."""
    if workers == "auto":
        return max(0, min(len(os.sched_getaffinity(0)) - 1, MAX_AUTO_WORKERS))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be 'auto' or a count >= 0, got {workers!r}")
    return workers


def _iterate(config: ml_collections.ConfigDict, dataset: grain.MapDataset, sharding,
             progress: PipelineProgress | None = None) -> grain.DatasetIterator:
    workers = worker_count(config.workers)
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        workers = grain.MultiprocessingOptions(workers, per_worker_buffer_size=max(1, config.prefetch))
        iterable = iterable.mp_prefetch(workers, worker_init_fn=_init_worker)
    else:
        iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=config.prefetch))
    if progress is not None:
        progress.restart(worker_count(config.workers))
    if sharding is None:
        return iter(iterable if progress is None else iterable.map(progress.mark_loaded))
    host = iter(iterable.map(functools.partial(_transfer, sharding=sharding, progress=progress)))
    iterator = grain.experimental.ThreadPrefetchDatasetIterator(host, prefetch_buffer_size=_DEVICE_PREFETCH)
    # The prefetch iterator has just asked `host` for its state, which makes each worker's iterator without
    # starting it; grain would then start worker k only when asked for batch k, after worker k-1's first batch
    # (measured: 14 workers start one after another). Start all of them now, together.
    host.start_prefetch()
    return iterator


def train_iterator(
    config: ml_collections.ConfigDict,
    frame: pd.DataFrame,
    epochs: Sequence[int],
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    sharding=None,
    skipped_csv=None,
    progress: PipelineProgress | None = None,
    start_batch: int = 0,
) -> ResumableBatches:
    """The augmented, balanced training batches of `epochs`, one after another, for this process (see the
    module docstring), from batch `start_batch` of them on. Each epoch is its own draw and leaves out its own
    remainder, so batch b of an epoch is the same whichever epochs come before it."""
    process_index, process_count = _this_process(process_index, process_count)
    positive = frame["positive"].to_numpy(bool)
    plans = []
    for epoch in epochs:
        rows = epoch_sample(positive, epoch, config.balance, config.seed)
        steps = len(rows) // global_batch_size
        if steps == 0:
            raise ValueError(f"epoch {epoch} draws {len(rows)} images, fewer than one batch of {global_batch_size}")
        plan = _process_plan(rows[: steps * global_batch_size], global_batch_size, process_index, process_count)
        plans.append(np.column_stack([plan, np.full(len(plan), epoch)]))
    load = _LoadElement(
        source=_source(config, frame, skipped_csv),
        positive=positive,
        image_size=config.image_size,
        labelled=True,
        augment=TrainAugment(config.augment, config.image_size),
        seed=config.seed,
        replace_failures=True,
    )
    batches = grain.MapDataset.source(np.concatenate(plans)).map(load)
    batches = batches.batch(global_batch_size // process_count, batch_fn=_collate)
    start = functools.partial(_iterate, config, sharding=sharding, progress=progress)
    return ResumableBatches(batches, start, start_batch)


class ResumableBatches(grain.DatasetIterator):
    """An iterator over `batches` whose state is the number of batches it handed out.

    grain's multiprocess state holds one entry per worker and does not restore under another worker count,
    as on a machine with other cores under workers='auto'. A position restores under any: `set_state` starts
    a fresh iterator (`start`) at the saved batch. Batches are the same from any start: an element's augmentation
    is drawn from its epoch and its place in that epoch's draw.
    """

    def __init__(self, batches: grain.MapDataset, start: Callable[[grain.MapDataset], grain.DatasetIterator],
                 position: int = 0):
        super().__init__()
        self._batches, self._start = batches, start
        self._position = position
        self._iterator = start(batches[position:])

    def __next__(self):
        batch = next(self._iterator)
        self._position += 1
        return batch

    def get_state(self) -> dict:
        return {"next_batch": self._position}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("next_batch"), int):
            raise ValueError(f"not a position in the training batches (saved by another version?): {state!r}")
        if not 0 <= state["next_batch"] <= len(self._batches):
            raise ValueError(f"position {state['next_batch']} is beyond this run's {len(self._batches)} batches")
        if state["next_batch"] != self._position:
            self._iterator.close()
            self._position = state["next_batch"]
            self._iterator = self._start(self._batches[self._position:])

    def close(self) -> None:
        if hasattr(self, "_iterator"):  # also when `start` failed in __init__
            self._iterator.close()


def _ordered_batches(config, frame, global_batch_size, process_index, process_count, sharding, labelled: bool,
                     skipped_csv=None):
    process_index, process_count = _this_process(process_index, process_count)
    padded = math.ceil(len(frame) / global_batch_size) * global_batch_size
    rows = np.full(padded, -1, np.int64)
    rows[: len(frame)] = np.arange(len(frame))
    plan = _process_plan(rows, global_batch_size, process_index, process_count)
    positive = frame["positive"].to_numpy(bool) if labelled else np.zeros(len(frame), bool)
    load = _LoadElement(_source(config, frame, skipped_csv), positive, config.image_size, labelled)
    dataset = grain.MapDataset.source(plan).map(load).batch(global_batch_size // process_count, batch_fn=_collate)
    return _iterate(config, dataset, sharding)


def eval_batches(config, frame, global_batch_size, process_index=None, process_count=None, sharding=None,
                 skipped_csv=None):
    """Every row of a labelled frame once, in order, resized and normalised; padding rows are marked invalid."""
    return _ordered_batches(
        config, frame, global_batch_size, process_index, process_count, sharding, labelled=True, skipped_csv=skipped_csv
    )


def test_batches(config, frame, global_batch_size, process_index=None, process_count=None, sharding=None):
    """Every row of an unlabelled frame once, in order; batches hold 'image', 'valid' and 'index'."""
    return _ordered_batches(config, frame, global_batch_size, process_index, process_count, sharding, labelled=False)
