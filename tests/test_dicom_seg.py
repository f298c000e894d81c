"""DICOM Segmentation output (`predict --dicom-seg`): each object read back with highdicom and with pydicom holds the
submission's mask at the source's Rows x Columns, references the source's UIDs, names the segment and algorithm as
asked, and has UIDs of its own; sources MONOCHROME1, MONOCHROME2, non-square and real; empty masks on request;
file names that stay in the folder; files that appear whole."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest

from siim_jax.commands import predict
from siim_jax.data import rle
from siim_jax.inference import dicom_seg
from siim_jax.inference.dicom_seg import DicomSegWarning, DicomSegWriter
from siim_jax.inference.predictor import Inference, Predictor
from siim_jax.inference.submission import predict_submission, submission_items
from tests.conftest import REAL_DICOM
from tests.helpers import Brightness, top_left_lesion, write_lesion_dicom

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # DICOM PS3.6: Segmentation Storage SOP Class
PNEUMOTHORAX = ("36118008", "SCT")  # SNOMED CT
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = ("49755003", "SCT")


def predict_with_segs(data: Path, out: Path, empty: bool = False) -> tuple[dict[str, str], DicomSegWriter]:
    """Predicts `data` with `Brightness` (masks follow the bright pixels) at 64², writing the submission and the
    DICOM Segmentations; returns {ImageId: RLE} and the writer."""
    writer = DicomSegWriter(out / "seg", empty=empty)
    inference = Inference(Predictor(Brightness(class_head=False), batch_size=2), 64, progress=False)
    predict_submission(inference, submission_items(data), out / "submission.csv", dicom_seg=writer)
    rows = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    return dict(rows.values), writer


def check_round_trip(seg_path: Path, source_path: Path, encoded: str) -> None:
    """The object at `seg_path`, read by highdicom and by pydicom, is the segmentation of the submission's RLE on
    the source image, as the issue specifies it."""
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    shape = (int(source.Rows), int(source.Columns))
    expected = rle.decode(encoded, *shape)
    source_uids = (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)

    seg = hd.seg.segread(seg_path)
    assert seg.get_source_image_uids() == [source_uids]
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), expected)

    ds = pydicom.dcmread(seg_path)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.SegmentationType == "BINARY"
    assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == (*shape, 1)
    np.testing.assert_array_equal(ds.pixel_array.astype(bool), expected)  # pydicom's own unpacking of the bits
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    (referenced_series,) = ds.ReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert not {ds.SOPInstanceUID, ds.SeriesInstanceUID} & set(source_uids)  # new UIDs, none copied
    (segment,) = ds.SegmentSequence
    assert segment.SegmentNumber == 1 and segment.SegmentLabel == "Pneumothorax"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    for sequence, code in ((segment.SegmentedPropertyTypeCodeSequence, PNEUMOTHORAX),
                           (segment.SegmentedPropertyCategoryCodeSequence, MORPHOLOGICALLY_ABNORMAL_STRUCTURE)):
        assert (sequence[0].CodeValue, sequence[0].CodingSchemeDesignator) == code
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "siim-jax"
    assert algorithm.AlgorithmVersion == importlib.metadata.version("siim-jax")


def test_round_trip_of_monochrome1_monochrome2_and_non_square_sources(tmp_path):
    data = tmp_path / "data"
    sources = {
        "1.8.1": write_lesion_dicom(data / "1.8.1.dcm", (96, 160)),
        "1.8.2": write_lesion_dicom(data / "1.8.2.dcm", (160, 96), "MONOCHROME1"),
        "1.8.3": write_lesion_dicom(data / "1.8.3.dcm", (128, 128), "MONOCHROME1"),
    }
    dark = data / "1.8.4.dcm"  # no lesion: an empty mask
    write_lesion_dicom(dark, (64, 80))
    shown = pydicom.dcmread(dark)
    shown.PixelData = np.zeros((64, 80), np.uint8).tobytes()
    shown.save_as(dark)

    rows, writer = predict_with_segs(data, tmp_path)
    assert rows["1.8.4"] == rle.EMPTY and all(rows[image_id] != rle.EMPTY for image_id in sources)
    assert sorted(path.name for path in writer.written) == [f"{image_id}.seg.dcm" for image_id in sorted(sources)]
    assert sorted(os.listdir(tmp_path / "seg")) == sorted(path.name for path in writer.written)  # nothing else
    for image_id, source in sources.items():
        check_round_trip(tmp_path / "seg" / f"{image_id}.seg.dcm", source, rows[image_id])
    uids = [pydicom.dcmread(path).SOPInstanceUID for path in writer.written]
    assert len(set(uids)) == len(uids)


def test_round_trip_of_the_real_radiograph_and_its_monochrome1_twin(siim_real, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    real = Path(shutil.copy(REAL_DICOM, data))
    twin = Path(shutil.copy(siim_real / "Fake_MONOHR1.dcm", data))
    rows, writer = predict_with_segs(data, tmp_path, empty=True)
    # Both files carry the same SOPInstanceUID (the twin differs in one byte): two objects, two names, one series.
    uid = pydicom.dcmread(real, stop_before_pixels=True).SOPInstanceUID
    assert [path.name for path in writer.written] == [f"{uid}.seg.dcm", f"{uid}-2.seg.dcm"]
    for path, source in zip(writer.written, sorted([real, twin], key=lambda p: p.stem)):
        check_round_trip(path, source, rows[source.stem])
    first, second = (pydicom.dcmread(path) for path in writer.written)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)


def test_empty_masks_write_nothing_unless_asked(tmp_path):
    source = write_lesion_dicom(tmp_path / "1.6.1.dcm", (48, 80))
    empty = np.zeros((48, 80), bool)
    assert DicomSegWriter(tmp_path / "default").add(source, empty) is None
    assert not os.listdir(tmp_path / "default")
    path = DicomSegWriter(tmp_path / "asked", empty=True).add(source, empty)
    check_round_trip(path, source, rle.EMPTY)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom, writing the crafted UID
@pytest.mark.parametrize("crafted", ["../../escape", "..", "/etc/passwd", "a/../../b"])
def test_a_crafted_sop_instance_uid_writes_nothing_outside_the_folder(tmp_path, crafted):
    source = write_lesion_dicom(tmp_path / "in" / "source.dcm", (32, 48), SOPInstanceUID=crafted)
    out = tmp_path / "deep" / "seg"
    path = DicomSegWriter(out).add(source, top_left_lesion((32, 48)))
    assert path.parent == out and os.listdir(out) == [path.name]
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {source, path}
    assert pydicom.dcmread(path).ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID \
        == crafted  # the reference itself is the source's, as it is


def test_objects_are_synced_then_renamed_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    source = write_lesion_dicom(tmp_path / "1.5.1.dcm", (32, 48))
    out = tmp_path / "seg"
    out.mkdir()
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        "folder" if os.fstat(fd).st_ino == out.stat().st_ino else f"file {os.fstat(fd).st_size}") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    path = DicomSegWriter(out).add(source, top_left_lesion((32, 48)))
    assert events == [f"file {path.stat().st_size}", "folder", "rename", "folder"]

    def half_then_fail(self, filename, **options):
        Path(filename).write_bytes(b"DICM" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        DicomSegWriter(tmp_path / "failed").add(source, top_left_lesion((32, 48)))
    assert not os.listdir(tmp_path / "failed")


def test_a_source_it_cannot_reference_warns_naming_it_and_the_run_goes_on(tmp_path):
    data = tmp_path / "data"
    good = write_lesion_dicom(data / "1.4.1.dcm", (32, 48))
    bad = write_lesion_dicom(data / "1.4.2.dcm", (32, 48))
    ds = pydicom.dcmread(bad)
    del ds.StudyInstanceUID
    ds.save_as(bad)
    with pytest.warns(DicomSegWarning, match=rf"{bad}: no DICOM Segmentation written \(AttributeError: .*StudyInst"):
        rows, writer = predict_with_segs(data, tmp_path)
    assert writer.failed == [str(bad)] and [path.name for path in writer.written] == ["1.4.1.seg.dcm"]
    check_round_trip(writer.written[0], good, rows["1.4.1"])


def test_a_mask_of_another_shape_than_the_source_is_refused(tmp_path):
    source = write_lesion_dicom(tmp_path / "1.3.1.dcm", (32, 48))
    with pytest.raises(ValueError, match=r"a mask of shape \(48, 32\) for 1.3.1, whose Rows x Columns are \(32, 48\)"):
        DicomSegWriter(tmp_path / "seg").add(source, top_left_lesion((32, 48)).T)


def test_highdicom_takes_the_code_the_issue_names():
    description = dicom_seg.segment_description()
    assert (description.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            description.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) == PNEUMOTHORAX


def test_dicom_seg_empty_alone_is_refused_before_a_model_loads(tmp_path):
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "no-such-run"), "--data", str(tmp_path),
                              "--out", str(tmp_path / "submission.csv"), "--dicom-seg-empty"])
    with pytest.raises(SystemExit, match="--dicom-seg-empty needs --dicom-seg DIR"):
        predict.run(args)
