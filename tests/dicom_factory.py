"""Builds DICOM files of every kind the decoder must handle (or reject), written at test time, and decodes them
the reference way: with pydicom alone."""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def ramp(height: int = 64, width: int = 48, dtype=np.uint8, top: int = 255) -> np.ndarray:
    """Pixels rising linearly from 0 to `top` in reading order."""
    return np.linspace(0, top, height * width).reshape(height, width).astype(dtype)


def dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements) -> Dataset:
    """An uncompressed single-frame dataset holding `pixels` (uint8/uint16 HxW, or uint8 HxWx3 RGB)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = elements.pop("SOPInstanceUID", generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "patient-1"
    ds.PatientSex = "F"
    ds.PatientAge = "045Y"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = elements.pop("BitsStored", bits)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _encapsulated(pixels: np.ndarray, syntax: str, frame: bytes, photometric: str, **elements) -> Dataset:
    ds = dataset(pixels, photometric, **elements)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


def jpeg_dataset(pixels: np.ndarray, quality: int = 95, extended: bool = False) -> Dataset:
    """An 8-bit JPEG Baseline dataset: MONOCHROME2 (the challenge's format) for (H, W) pixels, YBR_FULL_422 (what
    Pillow writes: YCbCr, chroma subsampled) for (H, W, 3) RGB ones. `extended`: the same stream marked as JPEG
    Extended (process 2, an 8-bit extended-sequential frame), as some PACS export 8-bit images."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    stream = buffer.getvalue().replace(b"\xff\xc0", b"\xff\xc1", 1) if extended else buffer.getvalue()
    photometric = "YBR_FULL_422" if pixels.ndim == 3 else "MONOCHROME2"
    return _encapsulated(pixels, JPEGExtended12Bit if extended else JPEGBaseline8Bit, stream, photometric)


def compressed_dataset(pixels: np.ndarray, syntax: str, bits_stored: int | None = None, **options) -> Dataset:
    """`pixels` compressed by pydicom's own encoders (RLE, JPEG-LS through pyjpegls, JPEG 2000 through
    pylibjpeg-openjpeg); `options` go to the encoder (jls_error, j2k_psnr, ...)."""
    ds = dataset(pixels, "RGB" if pixels.ndim == 3 else "MONOCHROME2", BitsStored=bits_stored or pixels.itemsize * 8)
    ds.compress(syntax, **options)
    return ds


def rle_dataset(pixels: np.ndarray) -> Dataset:
    ds = dataset(pixels)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    return ds


def _huffman_bits(differences: np.ndarray) -> str:
    """Each difference as its category's 5-bit code (the category itself, see the table in lossless_jpeg_dataset)
    followed by the category's extra bits (a negative difference d as d - 1 in that many bits)."""
    out = []
    for difference in differences.tolist():
        category = abs(difference).bit_length()
        out.append(format(category, "05b"))
        if 0 < category < 16:
            out.append(format(difference if difference > 0 else difference + (1 << category) - 1, f"0{category}b"))
    return "".join(out)


def lossless_jpeg_dataset(pixels: np.ndarray, bits_stored: int | None = None) -> Dataset:
    """A greyscale JPEG Lossless, First-Order Prediction (process 14, selection value 1) dataset; no installed
    package encodes one, so the stream is written here (ITU T.81 annex H): the first row predicts from the left,
    the first column from above, the first pixel from 2**(P-1), every other pixel from its left neighbour."""
    precision = bits_stored or pixels.itemsize * 8
    values = pixels.astype(np.int64)
    predicted = np.empty_like(values)
    predicted[0, 0] = 1 << (precision - 1)
    predicted[0, 1:] = values[0, :-1]
    predicted[1:, 0] = values[:-1, 0]
    predicted[1:, 1:] = values[1:, :-1]
    differences = (values - predicted + 2**15) % 2**16 - 2**15  # modulo 2**16, as the decoder takes them
    bits = _huffman_bits(differences.ravel())
    bits += "1" * (-len(bits) % 8)  # pad the last byte with ones
    scan = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    rows, cols = pixels.shape
    frame = struct.pack(">HBHHB", 11, precision, rows, cols, 1) + bytes([1, 0x11, 0])
    code_lengths = bytes([0, 0, 0, 0, 17] + [0] * 11)  # categories 0..16, all with 5-bit codes
    table = struct.pack(">HB", 2 + 1 + 16 + 17, 0) + code_lengths + bytes(range(17))
    start_of_scan = struct.pack(">HBBBBBB", 8, 1, 1, 0, 1, 0, 0)  # predictor 1, no point transform
    stream = (b"\xff\xd8" + b"\xff\xc3" + frame + b"\xff\xc4" + table + b"\xff\xda" + start_of_scan + scan
              + b"\xff\xd9")
    return _encapsulated(pixels, JPEGLosslessSV1, stream, "MONOCHROME2", BitsStored=precision)


def unsupported_syntax_dataset(pixels: np.ndarray) -> Dataset:
    """Claims JPEG 2000 Part 2 multi-component, which no decoder pydicom knows of handles."""
    return _encapsulated(pixels, JPEG2000MCLossless, b"\xff\x4f\xff\x51" + bytes(64), "MONOCHROME2")


def sample(name: str) -> str:
    """A test file shipped inside pydicom's package (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom ships no {name}"
    return path


def _window_range(ds: Dataset) -> tuple[float, float]:
    """The output range of a window (PS3.3 C.11.2.1.2): the modality LUT's, else the stored values', rescaled."""
    if "ModalityLUTSequence" in ds:
        return 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    bits = int(ds.BitsStored)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    return low * slope + intercept, high * slope + intercept


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.round(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def pydicom_reference(path) -> np.ndarray:
    """read_dicom's documented output computed with pydicom alone: the first frame of pixel_array; colour (pydicom's
    RGB, a palette through apply_color_lut) as 0.299 R + 0.587 G + 0.114 B; monochrome as `pydicom_grey` maps it."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:
        grey = pixels @ np.array([0.299, 0.587, 0.114])
        return np.round(grey).astype(np.uint8) if pixels.dtype == np.uint8 else _scaled(grey, grey.min(), grey.max())
    return pydicom_grey(ds, pixels)


def pydicom_grey(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """Monochrome stored values as read_dicom documents their mapping, with pydicom's transforms: apply_modality_lut
    and apply_voi_lut (LUT preferred), scaled from the VOI's output range, else (wider than 8 bits, or through a
    modality transform) from the value range; MONOCHROME1 inverted."""
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds, prefer_lut=True).astype(np.float64)
    if ds.get("VOILUTSequence"):
        grey = _scaled(values, 0, 2.0 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1)
    elif "WindowCenter" in ds:
        grey = _scaled(values, *_window_range(ds))
    elif pixels.dtype == np.uint8 and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:
        grey = pixels
    else:
        grey = _scaled(values, values.min(), values.max())
    return 255 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


def save(ds: Dataset, path) -> str:
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def read_back(path) -> Dataset:
    return pydicom.dcmread(path)
