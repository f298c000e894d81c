"""Robust decoding of the challenge's DICOM files into uint8 greyscale arrays.

The challenge's files are 8-bit MONOCHROME2 JPEG Baseline; those are decoded straight from the encapsulated
JPEG bytes with Pillow, the fastest decoder available. Everything else goes through pydicom's own pixel
handlers and is brought to uint8 through the modality LUT and the VOI window (or LUT) the file carries.
Every failure becomes one `DicomError` naming the file and the reason.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
_PILLOW_SYNTAXES = (JPEG_BASELINE, JPEG_EXTENDED)
_RGB_TO_GREY = np.array([0.299, 0.587, 0.114])
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little and big endian


class DicomError(ValueError):
    """A DICOM file that cannot be turned into an image; `.path` and `.reason` say which and why."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclasses.dataclass(frozen=True)
class DicomImage:
    """A decoded radiograph and the metadata a user needs to map masks and predictions back."""

    path: str
    image_id: str
    pixels: np.ndarray  # uint8 (H, W), MONOCHROME2 (bright = dense)
    original_size: tuple[int, int]  # (height, width)
    patient_id: str | None = None
    sex: str | None = None
    age: int | None = None
    view: str | None = None


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value is not None else None


def _age(ds) -> int | None:
    """PatientAge is '38' in the challenge's files and '038Y' in the standard; other units are not years."""
    text = _text(ds, "PatientAge")
    if not text:
        return None
    digits, unit = (text[:-1], text[-1].upper()) if text[-1].isalpha() else (text, "Y")
    return int(digits) if digits.isdigit() and unit == "Y" else None


def _open(path, header_only: bool = False) -> pydicom.Dataset:
    """The dataset in `path`; with `header_only`, the elements before the pixel data, and `PixelData` set to
    b'' (its value left unread) when that element follows them."""
    try:
        with open(path, "rb") as file:
            ds = pydicom.dcmread(file, stop_before_pixels=header_only)
            if header_only and (ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
                                or file.read(4) in _PIXEL_DATA_TAGS):  # a deflated file is read whole
                ds.PixelData = b""
            return ds
    except FileNotFoundError:
        raise DicomError(path, "file not found") from None
    except IsADirectoryError:
        raise DicomError(path, "is a directory, not a DICOM file") from None
    except InvalidDicomError as exc:
        raise DicomError(path, f"not a DICOM file ({exc})") from None
    except Exception as exc:  # pydicom raises many kinds on truncated or garbled files
        raise DicomError(path, f"unreadable DICOM ({type(exc).__name__}: {exc})") from None


def _decode_jpeg(path, ds) -> np.ndarray:
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
        with Image.open(io.BytesIO(frame)) as image:
            image.load()
            if image.mode not in ("L", "I;16"):
                image = image.convert("L")
            return np.asarray(image)
    except Exception as exc:
        raise DicomError(path, f"corrupt or truncated JPEG pixel data ({type(exc).__name__}: {exc})") from None


def _syntax_name(syntax) -> str:
    return f"{getattr(syntax, 'name', syntax)} ({syntax})"


def _decode_with_pydicom(path, ds) -> np.ndarray:
    name = _syntax_name(ds.file_meta.get("TransferSyntaxUID"))
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        if "missing dependencies" in str(exc) or isinstance(exc, NotImplementedError):
            raise DicomError(path, f"unsupported transfer syntax {name}: {exc}") from None
        raise DicomError(path, f"cannot decode {name} pixel data ({exc})") from None
    except Exception as exc:
        raise DicomError(path, f"cannot decode {name} pixel data ({type(exc).__name__}: {exc})") from None


def _first_frame(ds, pixels: np.ndarray) -> np.ndarray:
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    if samples == 3:
        grey = pixels.astype(np.float64) @ _RGB_TO_GREY
        pixels = np.clip(np.round(grey), 0, 255).astype(np.uint8) if pixels.dtype == np.uint8 else grey
    return pixels


def _voi_lut(item, values: np.ndarray) -> np.ndarray:
    """Looks values up in a VOI LUT, scaled to [0, 1]. (pydicom's apply_voi overflows 8-bit LUT indices.)"""
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    table = np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(data, np.float64)
    entries = entries or 2**16
    index = np.clip(np.round(values - first_mapped), 0, entries - 1).astype(np.int64)
    return table[index].astype(np.float64) / (2**bits - 1)


def _to_uint8(ds, pixels: np.ndarray) -> np.ndarray:
    """Maps stored values to uint8 through the modality LUT and the VOI window or LUT, else the value range."""
    needs_lut = pixels.dtype != np.uint8 or "RescaleSlope" in ds or "ModalityLUTSequence" in ds
    if not (needs_lut or "WindowCenter" in ds or "VOILUTSequence" in ds):
        return pixels
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = float(np.ravel(ds.WindowCenter)[0])
        width = max(float(np.ravel(ds.WindowWidth)[0]), 1.0)
        unit = (values - (center - width / 2)) / width
    elif "VOILUTSequence" in ds:
        unit = _voi_lut(ds.VOILUTSequence[0], values)
    else:
        low, high = values.min(), values.max()
        unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.round(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8)


def _image_size(path, ds) -> tuple[int, int]:
    """(Rows, Columns) of a dataset that has pixel data of a non-zero size."""
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data (no PixelData element: a DICOM without an image, or cut short)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows == 0 or cols == 0:
        raise DicomError(path, f"zero-size image ({rows}x{cols})")
    return rows, cols


def _uses_pillow(ds) -> bool:
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(ds) else None
    return syntax in _PILLOW_SYNTAXES and int(ds.get("BitsAllocated", 8)) == 8


def read_header(path) -> pydicom.Dataset:
    """The header of a DICOM file, read without its pixels, checked as far as a header can be.

    Raises `DicomError` when the file is not DICOM, has no PixelData element or a zero size (also what a header
    cut short looks like), or uses a transfer syntax that no installed decoder handles. Truncated or corrupt
    pixel data shows only when `read_dicom` decodes it.
    """
    ds = _open(path, header_only=True)
    _image_size(path, ds)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and not _uses_pillow(ds):
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:  # a UID pydicom has no decoder for at all
            available = False
        if not available:
            raise DicomError(path, f"unsupported transfer syntax {_syntax_name(syntax)}: no installed decoder")
    return ds


def read_dicom(path) -> DicomImage:
    """Reads one DICOM file into a `DicomImage`; raises `DicomError` naming the file for anything unreadable."""
    ds = _open(path)
    rows, cols = _image_size(path, ds)
    if _uses_pillow(ds):
        pixels = _decode_jpeg(path, ds)
    else:
        pixels = _first_frame(ds, _decode_with_pydicom(path, ds))
    if pixels.shape != (rows, cols):
        raise DicomError(path, f"decoded shape {pixels.shape} does not match Rows x Columns {rows}x{cols}")
    pixels = _to_uint8(ds, pixels)
    if _text(ds, "PhotometricInterpretation") == "MONOCHROME1":
        pixels = 255 - pixels
    image_id = _text(ds, "SOPInstanceUID") or os.path.splitext(os.path.basename(path))[0]
    return DicomImage(
        path=os.fspath(path),
        image_id=image_id,
        pixels=np.ascontiguousarray(pixels, dtype=np.uint8),
        original_size=(rows, cols),
        patient_id=_text(ds, "PatientID"),
        sex=_text(ds, "PatientSex"),
        age=_age(ds),
        view=_text(ds, "ViewPosition"),
    )
