"""Robust decoding of DICOM radiographs into uint8 greyscale arrays.

The challenge's files are 8-bit MONOCHROME2 JPEG Baseline; single-sample 8-bit JPEG is decoded straight from the
encapsulated bytes with Pillow, the fastest decoder for it. Everything else (colour JPEG, 12-bit JPEG Extended,
JPEG Lossless, JPEG-LS, JPEG 2000, RLE, uncompressed) goes through pydicom and its pylibjpeg plugins (pyjpegls
for JPEG-LS). Colour becomes luma (0.299 R + 0.587 G + 0.114 B of pydicom's RGB); a multi-frame file gives its
first frame, with a warning. Monochrome values become uint8 through pydicom's modality LUT, then its VOI LUT
(preferred when the file also has a window) or window (following VOILUTFunction), scaled from the VOI output
range to 0..255; without a VOI, wider than 8-bit values are scaled from their own range. MONOCHROME1 is inverted
last.
Every failure becomes one `DicomError` naming the file and the reason.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
)
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

_PILLOW_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Where pydicom's first choice is not the fastest (tools/bench_formats.py): pyjpegls decodes JPEG-LS to the same
# values as pylibjpeg-libjpeg in under a third of the time.
_FASTER_PLUGINS = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}
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
        frame = next(generate_frames(ds.PixelData, number_of_frames=_frame_count(path, ds)))
        with Image.open(io.BytesIO(frame)) as image:
            image.load()
            if image.mode != "L":
                image = image.convert("L")
            return np.asarray(image)
    except Exception as exc:
        raise DicomError(path, f"corrupt or truncated JPEG pixel data ({type(exc).__name__}: {exc})") from None


def _syntax_name(syntax) -> str:
    return f"{getattr(syntax, 'name', syntax)} ({syntax})"


def _plugin(syntax) -> str:
    """pydicom's decoding plugin for `syntax`: ours where it is installed, else (``""``) pydicom's own choice."""
    plugin = _FASTER_PLUGINS.get(syntax, "")
    return plugin if plugin and plugin in get_decoder(syntax).available_plugins else ""


def _decode_with_pydicom(path, ds) -> np.ndarray:
    """The first frame as pydicom decodes it: (H, W), or (H, W, 3) RGB (YBR converted) for colour."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    name = _syntax_name(syntax)
    try:
        ds.pixel_array_options(index=0, decoding_plugin=_plugin(syntax))
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        if "missing dependencies" in str(exc) or isinstance(exc, NotImplementedError):
            raise DicomError(path, f"unsupported transfer syntax {name}: {exc}") from None
        raise DicomError(path, f"cannot decode {name} pixel data ({exc})") from None
    except Exception as exc:
        short = "broadcast" in str(exc)  # what a frame with fewer values than Rows x Columns x Samples raises
        hint = " (the frame holds fewer values than Rows x Columns x SamplesPerPixel)" if short else ""
        raise DicomError(path, f"cannot decode {name} pixel data ({type(exc).__name__}: {exc}){hint}") from None


def _frame_count(path, ds) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise DicomError(path, f"invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from None


def _to_grey(ds, pixels: np.ndarray) -> np.ndarray:
    """Colour (RGB, or a palette's RGB) to luma; monochrome unchanged. uint8 stays uint8, wider goes to float."""
    if _text(ds, "PhotometricInterpretation") == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 2:
        return pixels
    grey = pixels.astype(np.float64) @ _RGB_TO_GREY
    return np.clip(np.round(grey), 0, 255).astype(np.uint8) if pixels.dtype == np.uint8 else grey


def _lut_for_pydicom(ds) -> pydicom.Dataset:
    """The file's first VOI LUT, widened to 16 bits when it is 8-bit: pydicom's apply_voi indexes an 8-bit LUT
    through uint8 indices, which wrap past entry 255 (the entries themselves are unchanged)."""
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    if bits != 8:
        return ds
    wide = pydicom.Dataset()
    wide.add_new("LUTDescriptor", item["LUTDescriptor"].VR, [entries, first, 16])
    wide["LUTData"] = item["LUTData"]
    view = pydicom.Dataset()
    view.file_meta = ds.file_meta
    view.VOILUTSequence = [wide]
    return view


def _has_voi_lut(ds) -> bool:
    sequence = ds.get("VOILUTSequence")
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def _apply_voi(ds, values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Values through pydicom's VOI LUT (preferred when both are present, as in apply_voi_lut) or window
    (following the file's VOILUTFunction), with the output range; without either, the values and their range."""
    if _has_voi_lut(ds):
        entries, first, bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
        indices = np.clip(np.rint(values), first, first + (entries or 2**16) - 1).astype(np.int64)
        return apply_voi(indices, _lut_for_pydicom(ds)), 0.0, 2.0**bits - 1
    if "WindowCenter" in ds and "WindowWidth" in ds:
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)  # the ends of the output range
        return apply_windowing(values, ds), float(low), float(high)
    return values, float(values.min()), float(values.max())


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    unit = (values.astype(np.float64) - low) / (high - low) if high > low else np.zeros(values.shape)
    return np.round(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8)


def _to_uint8(path, ds, pixels: np.ndarray) -> np.ndarray:
    """Maps monochrome stored values to uint8 through the modality LUT and the VOI LUT or window, else the value
    range; 8-bit values with neither pass unchanged, as does grey from 8-bit colour (wider colour maps by range)."""
    if _text(ds, "PhotometricInterpretation") not in _MONOCHROME:
        return pixels if pixels.dtype == np.uint8 else _scaled(pixels, pixels.min(), pixels.max())
    transformed = any(key in ds for key in ("RescaleSlope", "ModalityLUTSequence", "WindowCenter")) or _has_voi_lut(ds)
    if pixels.dtype == np.uint8 and not transformed:
        return pixels
    try:
        return _scaled(*_apply_voi(ds, apply_modality_lut(pixels, ds)))
    except (ValueError, NotImplementedError, IndexError, KeyError) as exc:
        raise DicomError(path, f"cannot apply the modality or VOI transform ({type(exc).__name__}: {exc})") from None


def _image_size(path, ds) -> tuple[int, int]:
    """(Rows, Columns) of a dataset that has pixel data of a non-zero size."""
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data (no PixelData element: a DICOM without an image, or cut short)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows == 0 or cols == 0:
        raise DicomError(path, f"zero-size image ({rows}x{cols})")
    return rows, cols


def _uses_pillow(ds) -> bool:
    """Pillow is the fastest decoder of 8-bit JPEG, but only greyscale takes this path: Pillow would read a
    colour JPEG's components as YCbCr whatever the file's PhotometricInterpretation says."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(ds) else None
    return (syntax in _PILLOW_SYNTAXES and int(ds.get("BitsAllocated", 8)) == 8
            and int(ds.get("SamplesPerPixel", 1)) == 1 and _text(ds, "PhotometricInterpretation") in _MONOCHROME)


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
    frames = _frame_count(path, ds)
    if frames > 1:
        warnings.warn(f"{os.fspath(path)}: multi-frame image ({frames} frames); using the first", stacklevel=2)
    pixels = _decode_jpeg(path, ds) if _uses_pillow(ds) else _to_grey(ds, _decode_with_pydicom(path, ds))
    if pixels.shape != (rows, cols):
        raise DicomError(path, f"decoded shape {pixels.shape} does not match Rows x Columns {rows}x{cols}")
    pixels = _to_uint8(path, ds, pixels)
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
