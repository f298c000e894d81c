"""Label files of the challenge and the index that joins them with a DICOM tree.

Accepted label files: stage-1 `train-rle.csv` (header `ImageId, EncodedPixels`, values after a space),
stage-2 `stage_2_train.csv` (no spaces), the sample images' `fname,mask` file, and sample submissions; a UTF-8
BOM and CRLF line ends are fine. An image may have several rows; its masks are OR-merged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from siim_jax.data import rle
from siim_jax.data.dicom import DicomError, read_header
from siim_jax.data.layout import DICOM_SUFFIX

IMAGE_ID = "ImageId"
ENCODED_PIXELS = "EncodedPixels"
_HEADER_ALIASES = {"imageid": IMAGE_ID, "fname": IMAGE_ID, "encodedpixels": ENCODED_PIXELS, "mask": ENCODED_PIXELS}


class LabelError(ValueError):
    """A label file or index that cannot be used as it is; the message names the file and the reason."""


def read_labels(path) -> pd.DataFrame:
    """Reads a label CSV or sample submission into columns ImageId, EncodedPixels (stripped strings)."""
    try:
        frame = pd.read_csv(path, dtype=str, encoding="utf-8-sig", skipinitialspace=True, keep_default_na=False)
    except FileNotFoundError:
        raise LabelError(f"{path}: file not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise LabelError(f"{path}: not a readable CSV ({exc})") from None
    renamed = {column: _HEADER_ALIASES.get(column.strip().lower()) for column in frame.columns}
    if sorted(filter(None, renamed.values())) != [ENCODED_PIXELS, IMAGE_ID] or len(frame.columns) != 2:
        raise LabelError(f"{path}: expected the columns ImageId, EncodedPixels, found {list(frame.columns)}")
    frame = frame.rename(columns=renamed)[[IMAGE_ID, ENCODED_PIXELS]]
    frame = frame.apply(lambda column: column.str.strip())
    if (frame[IMAGE_ID] == "").any():
        line = int(np.flatnonzero(frame[IMAGE_ID] == "")[0]) + 2
        raise LabelError(f"{path}: empty ImageId on line {line}")
    frame.loc[frame[ENCODED_PIXELS] == "", ENCODED_PIXELS] = rle.EMPTY
    return frame


def read_image_ids(path) -> list[str]:
    """The unique ImageIds of a label file or sample submission, in file order."""
    return list(dict.fromkeys(read_labels(path)[IMAGE_ID]))


def _run_union_area(rles: Iterable[str], image_id: str, image_size: tuple[int, int] | None) -> int:
    """Pixels covered by the OR of several relative-RLE rows, computed on the runs without painting a mask; with
    `image_size` (height, width), a run past that image raises `rle.RLEError`."""
    intervals = []
    for text in rles:
        starts, ends = rle.relative_runs(text, image_id)
        if image_size is not None and ends.size and ends[-1] > image_size[0] * image_size[1]:
            height, width = image_size
            raise rle.RLEError(
                f"RLE run ends at pixel {int(ends[-1])}, past the {height}x{width} image (ImageId {image_id})"
            )
        intervals.append(np.stack([starts, ends], axis=1))
    runs = np.concatenate(intervals) if intervals else np.zeros((0, 2), np.int64)
    runs = runs[np.argsort(runs[:, 0], kind="stable")]
    area, reach = 0, 0
    for start, end in runs.tolist():
        area += max(0, end - max(start, reach))
        reach = max(reach, end)
    return area


def per_image(
    labels: pd.DataFrame,
    image_size: tuple[int, int] | Mapping[str, tuple[int, int]] = (1024, 1024),
    rejected: list | None = None,
) -> pd.DataFrame:
    """One row per image: its positive RLE rows (tuple), positive flag and merged mask area in pixels.

    `image_size` is the (height, width) of every image, or a mapping from ImageId to each image's own size (an
    image it leaves out is not checked against any size). A malformed RLE, or a run past its image, raises
    `rle.RLEError`, or, given a `rejected` list, leaves its image out and appends (ImageId, reason) to that list.
    """
    rows = []
    for image_id, group in labels.groupby(IMAGE_ID, sort=False):
        positives = tuple(text for text in group[ENCODED_PIXELS] if text != rle.EMPTY)
        size = image_size.get(image_id) if isinstance(image_size, Mapping) else image_size
        try:
            area = _run_union_area(positives, image_id, size)
        except rle.RLEError as exc:
            if rejected is None:
                raise
            rejected.append((image_id, str(exc)))
            continue
        rows.append((image_id, positives, bool(positives), area, len(group)))
    return pd.DataFrame(rows, columns=["image_id", "rles", "positive", "area", "n_rows"])


def find_dicoms(root) -> dict[str, str]:
    """Maps ImageId (the file name's stem, the SOPInstanceUID) to path for every .dcm below root."""
    root = Path(root)
    if not root.is_dir():
        raise LabelError(f"{root}: DICOM folder not found")
    found: dict[str, str] = {}
    for path in sorted(root.rglob(f"*{DICOM_SUFFIX}")):
        image_id = path.stem
        if image_id in found:
            raise LabelError(f"duplicate ImageId {image_id}: {found[image_id]} and {path}")
        found[image_id] = str(path)
    return found


class _Header(NamedTuple):
    patient_id: str | None
    problem: str | None  # why the file cannot be decoded; None when its header is usable
    size: tuple[int, int] | None  # (Rows, Columns) of a usable header


def _check_header(path: str) -> _Header:
    try:
        ds = read_header(path)
    except DicomError as exc:
        return _Header(None, exc.reason, None)
    return _Header(str(ds.get("PatientID", "")).strip() or None, None, (int(ds.Rows), int(ds.Columns)))


def assign_folds(positive: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Stratified group k-fold: whole groups go to one fold, positive and negative groups dealt out separately."""
    frame = pd.DataFrame({"positive": positive, "group": groups})
    group_positive = frame.groupby("group", sort=True)["positive"].any()
    rng = np.random.default_rng(seed)
    fold_of_group = {}
    offset = 0
    for stratum in (True, False):
        members = rng.permutation(group_positive.index[group_positive == stratum].to_numpy())
        for order, group in enumerate(members):
            fold_of_group[group] = (order + offset) % n_folds
        offset += len(members)
    return frame["group"].map(fold_of_group).to_numpy(np.int64)


SKIPPED_COLUMNS = ["image_id", "path", "reason"]


def skipped_frame(rows=()) -> pd.DataFrame:
    """A table of images left out of an index: (ImageId, the file at fault, the reason)."""
    return pd.DataFrame(list(rows), columns=SKIPPED_COLUMNS)


@dataclasses.dataclass
class Index:
    """Images joined with labels. `frame` has one row per image with a file (and labels where given); `skipped`
    (see `skipped_frame`) lists the images a lenient `build_index` left out."""

    frame: pd.DataFrame
    images_without_labels: list[str]
    labels_without_images: list[str]
    skipped: pd.DataFrame = dataclasses.field(default_factory=skipped_frame)

    def report(self) -> str:
        frame = self.frame
        text = f"{len(frame)} images, {int(frame['positive'].sum())} positive"
        if self.images_without_labels:
            text += f"; {len(self.images_without_labels)} images without labels"
        if self.labels_without_images:
            text += f"; {len(self.labels_without_images)} labelled ids without an image"
        if len(self.skipped):
            text += f"; {len(self.skipped)} images skipped (malformed labels or unreadable files)"
        return text


def build_index(
    dicom_dir,
    labels_csv=None,
    n_folds: int = 5,
    seed: int = 0,
    group_by_patient: bool = True,
    strict: bool = True,
) -> Index:
    """Joins a DICOM tree with a label file: per image its file, RLE rows, positive flag, area and fold.

    Without labels (a test set) every image is listed with no RLE and fold -1. Images without labels and
    labels without images are reported on the returned `Index`, not silently dropped.

    With labels, each labelled image's DICOM header is checked (`dicom.read_header`) and its rows are checked
    against its own Rows x Columns: a malformed RLE or a run past the image raises `LabelError` naming the label
    file, the ImageId and the reason, an unusable file `DicomError` naming it; with `strict=False` such images are
    left out of the folds and listed in `Index.skipped` instead.
    """
    files = find_dicoms(dicom_dir)
    frame = pd.DataFrame({"image_id": list(files), "path": list(files.values())})
    if labels_csv is None:
        frame = frame.assign(rles=[()] * len(frame), positive=False, area=0, fold=-1)
        return Index(frame, images_without_labels=[], labels_without_images=[])
    label_rows = read_labels(labels_csv)
    with_files = [image_id for image_id in dict.fromkeys(label_rows[IMAGE_ID]) if image_id in files]
    paths = tqdm(with_files, desc="reading DICOM headers", leave=False, disable=len(with_files) < 1000)
    headers = {image_id: _check_header(files[image_id]) for image_id in paths}
    rejected = None if strict else []
    try:
        sizes = {image_id: header.size for image_id, header in headers.items() if header.size is not None}
        labelled = per_image(label_rows, sizes, rejected)
    except rle.RLEError as exc:
        raise LabelError(f"{labels_csv}: {exc}") from None
    skipped = [(image_id, str(labels_csv), reason) for image_id, reason in rejected or ()]
    merged = frame.merge(labelled, on="image_id", how="inner")
    images_without_labels = sorted(set(files) - set(labelled["image_id"]) - {image_id for image_id, *_ in skipped})
    labels_without_images = sorted(set(labelled["image_id"]) - set(files))
    problems = [headers[image_id].problem for image_id in merged["image_id"]]
    unreadable = np.array([problem is not None for problem in problems], bool)
    if strict and unreadable.any():
        first = int(np.flatnonzero(unreadable)[0])
        raise DicomError(merged["path"].iloc[first], problems[first])
    skipped += [(row.image_id, row.path, problem) for row, problem in zip(merged.itertuples(), problems) if problem]
    if group_by_patient:
        merged["patient_id"] = [headers[image_id].patient_id or image_id for image_id in merged["image_id"]]
    else:
        merged["patient_id"] = merged["image_id"]
    merged = merged[~unreadable].reset_index(drop=True)
    merged["fold"] = assign_folds(merged["positive"].to_numpy(), merged["patient_id"].to_numpy(), n_folds, seed)
    return Index(merged.drop(columns="n_rows"), images_without_labels, labels_without_images, skipped_frame(skipped))


def merged_mask(row, image_size: tuple[int, int] = (1024, 1024)) -> np.ndarray:
    """The OR-merged bool mask of one index row."""
    return rle.decode_merged(row["rles"], *image_size, image_id=row["image_id"])

