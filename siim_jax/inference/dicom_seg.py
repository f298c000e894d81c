"""DICOM Segmentation objects of the final masks, for a workstation or PACS: `siim-jax predict ... --dicom-seg DIR`.

Each object is built by highdicom from the source image's header and the mask at the source's Rows x Columns: a
BINARY segmentation with one segment, "Pneumothorax" (SNOMED CT 36118008, in the category Morphologically Abnormal
Structure, 49755003), computed AUTOMATIC-ally by the algorithm siim-jax (family Artificial Intelligence, DCM 123110)
at this package's version. It references the source's study, series and SOP instance; its own SOP instance UID is
new, and so is its series: one new series per source study and run, the objects numbered within it.

An empty mask writes nothing unless `empty` is set. A source that highdicom cannot reference (no
StudyInstanceUID, say) gets no object and a `DicomSegWarning` naming the file and the reason; the run goes on.
Files are named after the source's SOPInstanceUID through `pictures.unique_file_name` (so a crafted UID cannot name
a path outside the folder), with the suffix `.seg.dcm`, and written whole, then renamed (`files.durable_file`).

highdicom copies the source's patient and study attributes, which DICOM requires present but allows empty
(type 2); a source that lacks some is given them empty. Projection radiographs have no frame of reference: for
such a source highdicom 0.28 copies PixelSpacing into a Pixel Measures macro without SliceThickness (which the
standard requires only with a frame of reference), and then its own reader refuses the object; so PixelSpacing is
left out of the objects of such sources. The geometry is the source's pixel grid all the same: the object
references the source image, with spatial locations preserved, at its Rows x Columns.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from siim_jax.data.dicom import DicomError, read_header
from siim_jax.files import durable_file
from siim_jax.pictures import unique_file_name

NAME = "siim-jax"
VERSION = importlib.metadata.version(NAME)
SUFFIX = ".seg.dcm"
SERIES_NUMBER = 9001  # out of the way of the modality's own series numbers; the series UID is what identifies it
SEGMENT_LABEL = "Pneumothorax"
# Patient and study attributes of type 2 (present, possibly empty) that highdicom copies from the source
_TYPE_2_SOURCE_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                             "ReferringPhysicianName", "StudyID", "AccessionNumber")


class DicomSegWarning(UserWarning):
    """A source image that gets no DICOM Segmentation, and why."""


def segment_description() -> hd.seg.SegmentDescription:
    """The one segment: pneumothorax, found automatically by siim-jax."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=NAME, family=codes.DCM.ArtificialIntelligence, version=VERSION
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Pneumothorax,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def _highdicom_source(header: pydicom.Dataset) -> pydicom.Dataset:
    """A shallow copy of the source's header for highdicom to build from: missing type 2 patient and study
    attributes empty, and without PixelSpacing when there is no frame of reference (see the module docstring)."""
    header = pydicom.Dataset(header)
    for keyword in _TYPE_2_SOURCE_ATTRIBUTES:
        if keyword not in header:
            setattr(header, keyword, None)
    if "FrameOfReferenceUID" not in header and "PixelSpacing" in header:
        del header.PixelSpacing
    return header


def segmentation(
    source: pydicom.Dataset, mask: np.ndarray, series_uid: str, instance_number: int
) -> hd.seg.Segmentation:
    """The binary segmentation of `mask` (bool, the source's Rows x Columns) on the source image `source` (its
    header is enough), as instance `instance_number` of the new series `series_uid`."""
    shape = (int(source.Rows), int(source.Columns))
    if mask.shape != shape:
        raise ValueError(f"a mask of shape {mask.shape} for {source.SOPInstanceUID}, whose Rows x Columns are {shape}")
    with warnings.catch_warnings():
        # highdicom warns about the source's one-component PatientName (the challenge's are UUIDs): not ours to fix
        warnings.filterwarnings("ignore", "The string .* is unlikely to represent the intended person name")
        return hd.seg.Segmentation(
            source_images=[_highdicom_source(source)],
            pixel_array=mask.astype(bool, copy=False),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment_description()],
            series_instance_uid=series_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=instance_number,
            manufacturer=NAME,
            manufacturer_model_name=NAME,
            software_versions=VERSION,
            device_serial_number="",
            omit_empty_frames=False,  # an empty mask, written on request, keeps its one (empty) frame
            content_description="Pneumothorax segmentation by siim-jax",
        )


class DicomSegWriter:
    """Writes one DICOM Segmentation per image into `out_dir`, of non-empty masks only unless `empty`; `written`
    lists the files."""

    def __init__(self, out_dir: str | Path, empty: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.empty = empty
        self.written: list[Path] = []
        self.failed: list[str] = []  # sources that got no object (each with a DicomSegWarning)
        self._names: set[str] = set()
        self._series: dict[str, tuple[str, int]] = {}  # source StudyInstanceUID -> (new series UID, objects in it)

    def add(self, source_path: str | Path, mask: np.ndarray) -> Path | None:
        """Writes the segmentation of `mask` on the image in `source_path`; returns its path, or None for an empty
        mask when empty ones are not written, or for a source it cannot reference (with a `DicomSegWarning`)."""
        if not (self.empty or mask.any()):
            return None
        try:
            source = read_header(source_path)
            series_uid, count = self._series.get(source.StudyInstanceUID, (generate_uid(), 0))
            seg = segmentation(source, mask, series_uid, count + 1)
        except (DicomError, AttributeError) as error:  # an unreadable header; an attribute highdicom needs, missing
            warnings.warn(f"{source_path}: no DICOM Segmentation written ({type(error).__name__}: {error})",
                          DicomSegWarning, stacklevel=2)
            self.failed.append(str(source_path))
            return None
        self._series[source.StudyInstanceUID] = (series_uid, count + 1)
        path = self.out_dir / unique_file_name(source.SOPInstanceUID, self._names, SUFFIX)
        with durable_file(path) as temporary:
            seg.save_as(temporary, enforce_file_format=True)
        self.written.append(path)
        return path
