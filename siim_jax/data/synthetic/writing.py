"""Writes a synthetic dataset in the challenge's layout: DICOM files, label files, worker processes."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import multiprocessing
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid
from tqdm import tqdm

from siim_jax.data import rle
from siim_jax.data.layout import DICOM_SUFFIX, SAMPLE_SUBMISSION_CSV, SPLIT_DIRS, STAGE2_CSV, TRAIN_CSV
from siim_jax.data.synthetic.anatomy import IMAGE_SIZE
from siim_jax.data.synthetic.cases import check_shape, load_mask_pool, synthesize_case
from siim_jax.data.synthetic.patients import DEFAULT_POSITIVE_FRACTION, CaseIdentity, Patient
from siim_jax.data.synthetic.rendering import DEFAULT_DIFFICULTY, check_unit_interval

JPEG_QUALITY = 92
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["siim-jax synthetic"])


def encode_jpeg(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode the JPEG")
    return data.tobytes()


def pixel_spacing(patient: Patient, shape: tuple[int, int]) -> list[str]:
    """(row, column) spacing in mm of an image of `shape`: the patient's at 1024², stretched with the image, so
    that the body keeps its size in millimetres."""
    if tuple(shape) == (IMAGE_SIZE, IMAGE_SIZE):
        return [patient.pixel_spacing, patient.pixel_spacing]
    return [f"{float(patient.pixel_spacing) * IMAGE_SIZE / size:.6g}" for size in shape]


def write_dicom(path: str | Path, pixels: np.ndarray, identity: CaseIdentity, patient: Patient) -> None:
    """Writes an 8-bit MONOCHROME2 image as one JPEG Baseline fragment with the real files' metadata."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = identity.image_id
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SIIM_JAX_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = identity.image_id
    ds.StudyDate, ds.StudyTime = "19010101", "000000.00"
    ds.AccessionNumber = ""
    ds.Modality, ds.ConversionType = "CR", "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {patient.view}"
    ds.PatientName = ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient.sex
    with config.disable_value_validation():  # the challenge's files say '62', where the standard says '062Y'
        ds.PatientAge = patient.age
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", patient.view
    ds.StudyInstanceUID, ds.SeriesInstanceUID = identity.study_uid, identity.series_uid
    ds.StudyID = ""
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = pixel_spacing(patient, pixels.shape)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.add_new(0x7FE00010, "OB", encapsulate([encode_jpeg(pixels)], has_bot=False))
    ds.save_as(path, enforce_file_format=True)


def dicom_path(out_dir: Path, split: str, identity: CaseIdentity) -> Path:
    return out_dir / SPLIT_DIRS[split] / identity.study_uid / identity.series_uid / f"{identity.image_id}{DICOM_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class _Task:
    out_dir: Path
    seed: int
    split: str
    index: int
    positive_fraction: float
    difficulty: float
    mask_source: str | None
    shape: tuple[int, int]


class _Written(NamedTuple):
    split: str
    image_id: str
    rles: tuple[str, ...]

    @property
    def positive(self) -> bool:
        return self.rles != (rle.EMPTY,)


def _write_case(task: _Task) -> _Written:
    """Renders and writes one case."""
    case = synthesize_case(task.seed, task.split, task.index, task.positive_fraction, task.difficulty, task.mask_source,
                           task.shape)
    path = dicom_path(task.out_dir, task.split, case.identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(path, case.image, case.identity, case.patient)
    return _Written(task.split, case.identity.image_id, case.rles)


def _keep_freed_memory() -> None:
    """Rendering allocates and frees many arrays of megabytes; by default glibc hands them back to the kernel
    and page-faults them in again, a quarter of the run time. Raising its mmap and trim thresholds keeps them
    in the heap (glibc only; elsewhere a no-op). It lasts for the process."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
    mallopt(M_TRIM_THRESHOLD, 256 << 20)


def _prepare_worker() -> None:
    cv2.setNumThreads(1)  # the pool's processes already fill the cores
    _keep_freed_memory()


def write_labels(path: Path, rows: list[tuple[str, str]], separator: str) -> None:
    header = f"ImageId{separator}EncodedPixels\n"
    path.write_text(header + "".join(f"{image_id}{separator}{encoded}\n" for image_id, encoded in rows))


def label_rows(written: list[_Written]) -> list[tuple[str, str]]:
    return [(case.image_id, encoded) for case in written for encoded in case.rles]


@dataclasses.dataclass(frozen=True)
class SyntheticSummary:
    out_dir: Path
    train_csv: Path
    sample_submission_csv: Path
    stage2_csv: Path | None
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    train_positives: int
    test_positives: int
    elapsed_s: float

    @property
    def images_per_s(self) -> float:
        return (len(self.train_ids) + len(self.test_ids)) / max(self.elapsed_s, 1e-9)


def generate(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    mask_source: str | Path | None = None,
    difficulty: float = DEFAULT_DIFFICULTY,
    positive_fraction: float = DEFAULT_POSITIVE_FRACTION,
    stage2: bool = False,
    processes: int = 1,
    progress: bool = True,
    shapes: Sequence[tuple[int, int]] = ((IMAGE_SIZE, IMAGE_SIZE),),
) -> SyntheticSummary:
    """Writes a synthetic dataset in the challenge's layout (see the module docstring) into an empty ``out_dir``.

    Image ``index`` of each split has ``shapes[index % len(shapes)]`` (Rows, Columns): the 1024² rendering
    stretched to that shape, its labels encoded at that shape."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; synthetic data goes into a new folder")
    check_unit_interval("positive_fraction", positive_fraction)
    check_unit_interval("difficulty", difficulty)
    if not shapes:
        raise ValueError("give at least one image shape")
    for shape in shapes:
        check_shape(shape)
    source = None if mask_source is None else str(mask_source)
    if source is not None:
        load_mask_pool(source)  # fail early on a bad file
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [
        _Task(out_dir, seed, split, index, positive_fraction, difficulty, source, tuple(shapes[index % len(shapes)]))
        for split, count in (("train", n_train), ("test", n_test))
        for index in range(count)
    ]
    start = time.perf_counter()
    written = _run_tasks(tasks, processes, progress)
    elapsed = time.perf_counter() - start

    train = [case for case in written if case.split == "train"]
    test = [case for case in written if case.split == "test"]
    write_labels(out_dir / TRAIN_CSV, label_rows(train), ", ")
    write_labels(out_dir / SAMPLE_SUBMISSION_CSV, [(case.image_id, rle.EMPTY) for case in test], ",")
    stage2_csv = out_dir / STAGE2_CSV if stage2 else None
    if stage2_csv:
        write_labels(stage2_csv, label_rows(train + test), ",")
    return SyntheticSummary(
        out_dir=out_dir,
        train_csv=out_dir / TRAIN_CSV,
        sample_submission_csv=out_dir / SAMPLE_SUBMISSION_CSV,
        stage2_csv=stage2_csv,
        train_ids=tuple(case.image_id for case in train),
        test_ids=tuple(case.image_id for case in test),
        train_positives=sum(case.positive for case in train),
        test_positives=sum(case.positive for case in test),
        elapsed_s=elapsed,
    )


def _run_tasks(tasks: list[_Task], processes: int, progress: bool) -> list[_Written]:
    bar = functools.partial(tqdm, total=len(tasks), desc="synth", unit="img", disable=not progress)
    if processes <= 1:
        _keep_freed_memory()
        return list(bar(map(_write_case, tasks)))
    # forkserver, not fork: a child forked after OpenCV started its thread pool can deadlock
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # import once in the server, not once per worker
    with context.Pool(processes, initializer=_prepare_worker) as pool:
        return list(bar(pool.imap(_write_case, tasks, chunksize=4)))
