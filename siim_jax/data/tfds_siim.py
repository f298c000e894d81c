"""The prepared cache: a TFDS builder that decodes the challenge's tree once into array_record at the training size.

``siim-jax prepare DATA_DIR --size 512 --out DIR`` reads the challenge tree (real or synthetic: dicom-images-train/,
train-rle.csv, optional dicom-images-test/) as the builder's manual dir and writes
``DIR/siim_pneumothorax/512px/1.0.0/``. Every record holds Tensor features only, so neither writing nor reading
needs TensorFlow: ``image`` uint8 (S, S), ``mask`` uint8 (S, S) in {0, 1}, ``image_id``, ``positive`` and
``original_size`` int32 (height, width). Splits: ``train`` (labelled) and ``test`` (when dicom-images-test exists).

Records keep the index's order. The dataset's metadata (``metadata.json``) holds, per split, the index columns
(ImageId, RLE rows, positive, area, PatientID, original size, and the record number, -1 for a file that could
not be decoded), so the pipeline builds its frames and folds without reading a record, and the list of skipped
files with reasons. A file that cannot be decoded is reported and skipped, never fatal.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tensorflow_datasets as tfds

from siim_jax.data import rle
from siim_jax.data.decode import DecodedExample, decode_example
from siim_jax.data.dicom import DicomError
from siim_jax.data.labels import build_index
from siim_jax.data.layout import TEST_DIR, TRAIN_CSV, TRAIN_DIR

NAME = "siim_pneumothorax"
VERSION = tfds.core.Version("1.0.0")
INDEX_COLUMNS = ("image_id", "rles", "positive", "area", "patient_id", "height", "width", "record")

log = logging.getLogger(__name__)


def _decode_or_reason(task: tuple[str, tuple[str, ...], int]) -> DecodedExample | str:
    try:
        return decode_example(*task)
    except (DicomError, rle.RLEError) as exc:
        return str(exc)


def _decoded(tasks: list, workers: int):
    """Decoded examples (or failure reasons) in task order, from a pool of `workers` processes when above 1."""
    if workers <= 1:
        yield from map(_decode_or_reason, tasks)
        return
    # one OpenCV thread per process: the pool's processes already fill the cores
    with multiprocessing.get_context("spawn").Pool(workers, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        yield from pool.imap(_decode_or_reason, tasks, chunksize=8)


def config_name(image_size: int) -> str:
    return f"{image_size}px"


@dataclasses.dataclass(eq=False)
class SiimConfig(tfds.core.BuilderConfig):
    image_size: int = 512


class SiimPneumothorax(tfds.core.GeneratorBasedBuilder):
    """SIIM-ACR pneumothorax images and merged masks at one training size."""

    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "Images and merged masks resized to the config's size; index in metadata.json."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"The challenge's tree: {TRAIN_DIR}/<study>/<series>/<ImageId>.dcm, {TRAIN_CSV}, optionally {TEST_DIR}/. "
        "`siim-jax synth` writes a synthetic one."
    )

    def __init__(self, *, labels_csv=None, workers: int = 1, **kwargs):
        self._labels_csv = labels_csv
        self._workers = workers
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        features = tfds.features.FeaturesDict(
            {
                # raw bytes: the default encoding widens every pixel to an int64 varint, 10x slower to parse
                "image": tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding="bytes"),
                "mask": tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding="bytes"),
                "image_id": tfds.features.Text(),
                "positive": tfds.features.Scalar(dtype=np.bool_),
                "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"SIIM-ACR pneumothorax radiographs and merged masks at {size}x{size}.",
            features=features,
            disable_shuffling=True,  # records in index order: metadata.json's columns line up with them
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        train = build_index(root / TRAIN_DIR, self._labels_csv or root / TRAIN_CSV, strict=False)
        self.info.metadata.update(
            image_size=self.builder_config.image_size,
            splits={},
            skipped=[  # images the index left out: malformed label rows, unusable DICOM headers
                {"split": "train", "image_id": row.image_id, "reason": f"{row.path}: {row.reason}"}
                for row in train.skipped.itertuples()
            ],
            images_without_labels=train.images_without_labels,
            labels_without_images=train.labels_without_images,
        )
        generators = {"train": self._generate_examples("train", train.frame)}
        if (root / TEST_DIR).is_dir():
            generators["test"] = self._generate_examples("test", build_index(root / TEST_DIR).frame)
        return generators

    def _generate_examples(self, split: str, frame: pd.DataFrame):
        columns = {name: [] for name in INDEX_COLUMNS}
        self.info.metadata["splits"][split] = columns
        size = self.builder_config.image_size
        tasks = [(path, rles, size) for path, rles in zip(frame["path"], frame["rles"])]
        records = 0
        for row, decoded in zip(frame.itertuples(index=False), _decoded(tasks, self._workers)):
            if isinstance(decoded, str):
                log.warning("skipped %s", decoded)
                self.info.metadata["skipped"].append({"split": split, "image_id": row.image_id, "reason": decoded})
                record, (height, width) = -1, (0, 0)
            else:
                record, (height, width) = records, decoded.original_size
                records += 1
            values = (row.image_id, list(row.rles), bool(row.positive), int(row.area), getattr(row, "patient_id", None),
                      int(height), int(width), record)  # fmt: skip
            for name, value in zip(INDEX_COLUMNS, values):
                columns[name].append(value)
            if record >= 0:
                yield row.image_id, {
                    "image": decoded.image,
                    "mask": decoded.mask,
                    "image_id": row.image_id,
                    "positive": bool(row.positive),
                    "original_size": np.asarray(decoded.original_size, np.int32),
                }


def prepared_path(prepared_dir, image_size: int) -> Path:
    """Where `prepare(..., out=prepared_dir)` writes the dataset for one size."""
    return Path(prepared_dir) / NAME / config_name(image_size) / str(VERSION)


def prepare(root, image_size: int, out, labels_csv=None, workers: int = 1) -> tfds.core.DatasetBuilder:
    """Decodes the challenge tree at `root` into `out` (a no-op when that size is already there)."""
    builder = SiimPneumothorax(
        config=SiimConfig(name=config_name(image_size), image_size=image_size),
        data_dir=str(out),
        file_format="array_record",
        labels_csv=labels_csv,
        workers=workers,
    )
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    return load_prepared(out, image_size)


def load_prepared(prepared_dir, image_size: int) -> tfds.core.DatasetBuilder:
    """The read-only builder of a prepared dataset (no generation code or TensorFlow needed)."""
    path = prepared_path(prepared_dir, image_size)
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"no prepared {image_size}px dataset at {path}; run `siim-jax prepare DATA_DIR --size {image_size} "
            f"--out {prepared_dir}`"
        )
    return tfds.builder_from_directory(str(path))


def index_frame(builder: tfds.core.DatasetBuilder, split: str) -> pd.DataFrame:
    """One split's index columns from the metadata, with skipped files still listed (record -1)."""
    frame = pd.DataFrame(builder.info.metadata["splits"][split], columns=list(INDEX_COLUMNS))
    frame["rles"] = [tuple(rles) for rles in frame["rles"]]
    return frame.assign(split=split)


def report(builder: tfds.core.DatasetBuilder) -> str:
    metadata = builder.info.metadata
    lines = []
    for split, columns in metadata["splits"].items():
        written = [positive for positive, record in zip(columns["positive"], columns["record"]) if record >= 0]
        lines.append(f"{split}: {len(written)} images ({sum(written)} positive)")
    if metadata["images_without_labels"]:
        lines.append(f"{len(metadata['images_without_labels'])} training images without labels left out")
    if metadata["labels_without_images"]:
        lines.append(f"{len(metadata['labels_without_images'])} labelled ImageIds without an image")
    if metadata["skipped"]:
        lines.append(f"{len(metadata['skipped'])} files skipped:")
        lines += [f"  {item['split']}: {item['reason']}" for item in metadata["skipped"]]
    return "\n".join(lines)
