"""The adversarial input corpus: bad DICOM files, label files, DICOM trees, configs and workdirs, each built at
test time (nothing binary is committed) together with the outcome it must have.

Outcomes are regular expressions of the reason an error must give; the test also checks that the message names
the file or config key at fault. `tests/test_reliability_inputs.py` runs every case; `CORPUS` lists them.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

from siim_jax.data.dicom import DicomImage

from . import dicom_factory as factory
from .dicom_factory import ramp

# ------------------------------------------------------------------------------------------------ DICOM files


@dataclasses.dataclass(frozen=True)
class DicomCase:
    """A file for `read_header` (what the index checks) and `read_dicom` (what training and predict decode).

    `header_error`: the reason both give (the index skips or rejects the file before training).
    `decode_error`: the reason only `read_dicom` gives (training stands in another image for the file, evaluation
    gives an invalid blank row).
    Neither: the file decodes, and `check` holds for the decoded image.
    """

    name: str
    build: Callable[[Path], Path]
    header_error: str | None = None
    decode_error: str | None = None
    check: Callable[[DicomImage], None] | None = None


def _saved(make: Callable[[], pydicom.Dataset], name: str) -> Callable[[Path], Path]:
    return lambda folder: Path(factory.save(make(), folder / name))


def _cut(source: Callable[[Path], Path], keep: Callable[[int], int]) -> Callable[[Path], Path]:
    """A copy of the file `source` builds, cut to keep(size) bytes."""

    def build(folder: Path) -> Path:
        data = source(folder).read_bytes()
        path = folder / "cut.dcm"
        path.write_bytes(data[: keep(len(data))])
        return path

    return build


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return build


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(ramp()).save(buffer, format="PNG")
    return buffer.getvalue()


def _directory(folder: Path) -> Path:
    (folder / "folder.dcm").mkdir()
    return folder / "folder.dcm"


def _jpeg_with_garbled_header(folder: Path) -> Path:
    """The JPEG stream's markers after its start-of-image overwritten (entropy-coded garbage decodes anyway)."""
    path = Path(factory.save(factory.jpeg_dataset(ramp()), folder / "garbled.dcm"))
    data = bytearray(path.read_bytes())
    start = data.index(b"\xff\xd8\xff") + 2
    data[start : start + 64] = bytes(range(64))
    path.write_bytes(bytes(data))
    return path


def _without_pixels() -> pydicom.Dataset:
    ds = factory.dataset(ramp())
    del ds.PixelData
    return ds


def _zero_rows() -> pydicom.Dataset:
    ds = factory.dataset(ramp())
    ds.Rows, ds.PixelData = 0, b""
    return ds


def _rows_beyond_the_data() -> pydicom.Dataset:
    ds = factory.dataset(ramp())
    ds.Rows = 128
    return ds


def _private_syntax(folder: Path) -> Path:
    ds = factory.dataset(ramp())
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9999.1"
    pydicom.dcmwrite(folder / "private.dcm", ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return folder / "private.dcm"


def _deflated() -> pydicom.Dataset:
    ds = factory.dataset(ramp())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


LUT = np.sqrt(np.arange(1024) / 1023) * 255  # an 8-bit VOI LUT over 10-bit stored values


def _monochrome1_voi_lut() -> pydicom.Dataset:
    ds = factory.dataset(ramp(dtype=np.uint16, top=1023), photometric="MONOCHROME1", BitsStored=10)
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [1024, 0, 8])
    item.add_new("LUTData", "US", [int(v) for v in LUT])
    ds.VOILUTSequence = [item]
    return ds


def _check_monochrome1_voi_lut(image: DicomImage) -> None:
    expected = 255 - np.floor(LUT)[ramp(dtype=np.uint16, top=1023)]
    assert np.abs(image.pixels.astype(int) - expected).max() <= 1


def _twelve_bit_monochrome1_voi_lut() -> pydicom.Dataset:
    """A 16-bit VOI LUT over 12-bit stored values, beside a window that the LUT overrides."""
    ds = factory.dataset(ramp(dtype=np.uint16, top=4095), photometric="MONOCHROME1", BitsStored=12,
                         WindowCenter=500, WindowWidth=200)
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", [int(v) for v in np.sqrt(np.arange(4096) / 4095) * 65535])
    ds.VOILUTSequence = [item]
    return ds


def _signed_rescaled() -> pydicom.Dataset:
    ds = factory.dataset((ramp(dtype=np.int16, top=4000) - 2000).view(np.uint16), BitsStored=16,
                         RescaleSlope=3, RescaleIntercept=-1024)
    ds.PixelRepresentation = 1
    return ds


def _shorter_than_rows_columns(make: Callable[[np.ndarray], pydicom.Dataset]) -> Callable[[], pydicom.Dataset]:
    """A compressed frame of 32 rows in a dataset that claims 64."""

    def build() -> pydicom.Dataset:
        ds = make(ramp(32, 48))
        ds.Rows = 64
        return ds

    return build


def _garbled_jpeg_ls() -> pydicom.Dataset:
    ds = factory.compressed_dataset(ramp(), JPEGLSLossless)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
    return ds


def _matches_pydicom(image: DicomImage) -> None:
    np.testing.assert_array_equal(image.pixels, factory.pydicom_reference(image.path))


def _multi_frame() -> pydicom.Dataset:
    frames = np.stack([ramp(), 255 - ramp()])
    ds = factory.dataset(frames[0], NumberOfFrames=2)
    ds.PixelData = frames.tobytes()
    return ds


def _signed() -> pydicom.Dataset:
    ds = factory.dataset(ramp(dtype=np.int16, top=2000) - 1000)
    ds.PixelRepresentation = 1
    return ds


def _rgb() -> pydicom.Dataset:
    return factory.dataset(np.stack([ramp(), ramp() // 2, np.full((64, 48), 30, np.uint8)], axis=-1), photometric="RGB")


def _size_is(height: int, width: int) -> Callable[[DicomImage], None]:
    def check(image: DicomImage) -> None:
        assert image.original_size == (height, width) and image.pixels.shape == (height, width)
        assert image.pixels.dtype == np.uint8

    return check


def _equals(expected: np.ndarray, tolerance: int = 0) -> Callable[[DicomImage], None]:
    def check(image: DicomImage) -> None:
        assert np.abs(image.pixels.astype(int) - expected.astype(int)).max() <= tolerance

    return check


def _spans_full_range(image: DicomImage) -> None:
    assert image.pixels.min() == 0 and image.pixels.max() == 255


_CHALLENGE_JPEG = _saved(lambda: factory.jpeg_dataset(ramp(512, 512)), "jpeg.dcm")  # the challenge's format, at 512²
_UNCOMPRESSED = _saved(lambda: factory.dataset(ramp()), "plain.dcm")
NOT_DICOM = "not a DICOM file"
NO_PIXELS = "no pixel data"

DICOM_CASES = [
    DicomCase("zero-byte", _write("empty.dcm", b""), header_error=NOT_DICOM),
    DicomCase("cut-in-preamble", _cut(_UNCOMPRESSED, lambda size: 100), header_error=NOT_DICOM),
    DicomCase("cut-in-header", _cut(_UNCOMPRESSED, lambda size: 300), header_error=NO_PIXELS),
    DicomCase("cut-in-pixel-data", _cut(_UNCOMPRESSED, lambda size: size - 1000),
              decode_error="pixel data .*less than expected"),
    DicomCase("cut-in-jpeg", _cut(_CHALLENGE_JPEG, lambda size: size // 2), decode_error=f"{NO_PIXELS} .*cut short"),
    DicomCase("garbled-jpeg-header", _jpeg_with_garbled_header, decode_error="corrupt or truncated JPEG"),
    DicomCase("png-renamed-dcm", _write("picture.dcm", _png_bytes()), header_error=NOT_DICOM),
    DicomCase("text-renamed-dcm", _write("notes.dcm", b"ImageId,EncodedPixels\n" * 50), header_error=NOT_DICOM),
    DicomCase("no-pixel-data", _saved(_without_pixels, "nopixels.dcm"), header_error=NO_PIXELS),
    DicomCase("zero-rows", _saved(_zero_rows, "zero.dcm"), header_error=r"zero-size image \(0x48\)"),
    DicomCase("rows-beyond-the-data", _saved(_rows_beyond_the_data, "rows.dcm"), decode_error="less than expected"),
    DicomCase("jpeg-shorter-than-rows-columns", _saved(_shorter_than_rows_columns(factory.jpeg_dataset), "short.dcm"),
              decode_error=r"decoded shape \(32, 48\) does not match Rows x Columns 64x48"),
    DicomCase("jpeg-2000-shorter-than-rows-columns",
              _saved(_shorter_than_rows_columns(lambda pixels: factory.compressed_dataset(pixels, JPEG2000Lossless)),
                     "short-j2k.dcm"), decode_error="fewer values than Rows x Columns"),
    DicomCase("garbled-jpeg-ls", _saved(_garbled_jpeg_ls, "jls.dcm"), decode_error="cannot decode JPEG-LS"),
    DicomCase("jpeg-2000-part-2-unsupported", _saved(lambda: factory.unsupported_syntax_dataset(ramp()), "mc.dcm"),
              header_error="unsupported transfer syntax JPEG 2000 Part 2"),
    DicomCase("private-transfer-syntax", _private_syntax,
              header_error="unsupported transfer syntax 1.2.826.0.1.3680043.9999.1"),
    DicomCase("a-directory", _directory, header_error="is a directory"),
    DicomCase("missing-file", lambda folder: folder / "missing.dcm", header_error="file not found"),
    DicomCase("16-bit-monochrome1-voi-lut", _saved(_monochrome1_voi_lut, "lut.dcm"), check=_check_monochrome1_voi_lut),
    DicomCase("16-bit-signed-value-range", _saved(_signed, "signed.dcm"), check=_spans_full_range),
    DicomCase("16-bit-signed-rescaled", _saved(_signed_rescaled, "rescaled.dcm"), check=_matches_pydicom),
    DicomCase("12-bit-monochrome1-voi-lut-and-window", _saved(_twelve_bit_monochrome1_voi_lut, "lut12.dcm"),
              check=_matches_pydicom),
    DicomCase("rgb", _saved(_rgb, "rgb.dcm"), check=_equals(np.round(ramp() * (0.299 + 0.587 / 2) + 30 * 0.114), 1)),
    DicomCase("multi-frame-first-frame", _saved(_multi_frame, "frames.dcm"), check=_equals(ramp())),
    DicomCase("deflated", _saved(_deflated, "deflated.dcm"), check=_equals(ramp())),
    DicomCase("rle-lossless", _saved(lambda: factory.rle_dataset(ramp()), "rle.dcm"), check=_equals(ramp())),
    DicomCase("512-square-jpeg", _CHALLENGE_JPEG, check=_size_is(512, 512)),
    DicomCase("2048-square-16-bit", _saved(lambda: factory.dataset(ramp(2048, 2048, np.uint16, 4095), BitsStored=12),
                                           "big.dcm"), check=_size_is(2048, 2048)),
]

# ------------------------------------------------------------------------------------------------ label files

IMAGE_IDS = ("1.2.3.1", "1.2.3.2", "1.2.3.3")
BAD_ID = IMAGE_IDS[1]
# The labels every well-formed variant holds: one positive, one negative, one with two overlapping rows.
LABEL_ROWS = ((IMAGE_IDS[0], "10 5 20 5"), (BAD_ID, "-1"), (IMAGE_IDS[2], "1000 50"), (IMAGE_IDS[2], "1030 40"))
EXPECTED_AREAS = {IMAGE_IDS[0]: 10, BAD_ID: 0, IMAGE_IDS[2]: 70}


def label_file(
    rows=LABEL_ROWS, header: str = "ImageId,EncodedPixels", separator: str = ",", newline: str = "\n", bom: bool = False
) -> bytes:
    text = newline.join([header, *(f"{image_id}{separator}{encoded}" for image_id, encoded in rows)]) + newline
    return ("\ufeff" if bom else "").encode() + text.encode()


def _with_bad_rle(encoded: str) -> bytes:
    return label_file(tuple((image_id, encoded if image_id == BAD_ID else text) for image_id, text in LABEL_ROWS))


@dataclasses.dataclass(frozen=True)
class LabelCase:
    """A label file joined with a tree holding IMAGE_IDS (`build_index`).

    No `error`: it parses to EXPECTED_AREAS. `error` with `row_level`: a malformed row of BAD_ID, which strict
    mode rejects (LabelError naming the file, the ImageId and the reason) and lenient mode skips, keeping the
    other images. `error` alone: a file no mode can use (LabelError naming the file).
    """

    name: str
    content: bytes | None  # None: no file at all
    error: str | None = None
    row_level: bool = False


LABEL_CASES = [
    LabelCase("stage-2-header", label_file()),
    LabelCase("stage-1-header-and-spaces", label_file(header="ImageId, EncodedPixels", separator=", ")),
    LabelCase("sample-images-header", label_file(header="fname,mask")),
    LabelCase("header-case-and-padding", label_file(header=" imageid , ENCODEDPIXELS ")),
    LabelCase("utf8-bom", label_file(bom=True)),
    LabelCase("crlf", label_file(newline="\r\n")),
    LabelCase("bom-crlf-stage-1",
              label_file(header="ImageId, EncodedPixels", separator=", ", newline="\r\n", bom=True)),
    LabelCase("blank-encoded-pixels-is-empty", label_file(tuple((i, "" if i == BAD_ID else e) for i, e in LABEL_ROWS))),
    LabelCase("odd-token-count", _with_bad_rle("10 5 20"), "odd number of values", row_level=True),
    LabelCase("negative-value", _with_bad_rle("10 -5"), "negative RLE value -5", row_level=True),
    LabelCase("non-numeric-value", _with_bad_rle("10 five"), "non-numeric RLE value 'five'", row_level=True),
    LabelCase("float-value", _with_bad_rle("10.5 5"), "non-numeric RLE value '10.5'", row_level=True),
    # inside a 1024² image, past the tree's 32x48 ones: runs are checked against each image's own size
    LabelCase("run-beyond-the-image", _with_bad_rle(f"{32 * 48 - 10} 20"), "past the 32x48 image", row_level=True),
    LabelCase("empty-image-id", label_file(((" ", "-1"), *LABEL_ROWS)), "empty ImageId on line 2"),
    LabelCase("wrong-columns", label_file(header="id,rle"), "expected the columns ImageId, EncodedPixels"),
    LabelCase("three-columns", label_file(header="ImageId,EncodedPixels,Extra", separator=",-1,"),
              "expected the columns"),
    LabelCase("zero-byte", b"", "not a readable CSV"),
    LabelCase("not-utf8", label_file().replace(b"1.2.3.1", b"1.2.3.\xff"), "not a readable CSV"),
    LabelCase("missing-file", None, "file not found"),
]

# ------------------------------------------------------------------------------------------------ DICOM trees


@dataclasses.dataclass(frozen=True)
class TreeCase:
    """A DICOM tree (image ids → folders) and label rows for `build_index`; `error` must be raised, else `check`
    holds for the index."""

    name: str
    files: tuple[tuple[str, str], ...]  # (ImageId, sub-folder)
    rows: tuple[tuple[str, str], ...]
    error: str | None = None
    check: Callable | None = None


def _reports(without_labels: list[str], without_images: list[str]) -> Callable:
    def check(index) -> None:
        assert index.images_without_labels == without_labels and index.labels_without_images == without_images
        assert sorted(index.frame["image_id"]) == sorted(set(IMAGE_IDS) - set(without_labels))

    return check


def _tree_rows(*image_ids: str) -> tuple[tuple[str, str], ...]:
    return tuple((image_id, "-1") for image_id in image_ids)


TREE_CASES = [
    TreeCase("duplicate-sop-instance-uid", (*((i, "a") for i in IMAGE_IDS), (IMAGE_IDS[0], "b")),
             _tree_rows(*IMAGE_IDS), error=rf"duplicate ImageId {IMAGE_IDS[0]}: .*a/{IMAGE_IDS[0]}\.dcm and .*b/"),
    TreeCase("ids-with-no-image", tuple((i, "a") for i in IMAGE_IDS), _tree_rows(*IMAGE_IDS, "9.9.9"),
             check=_reports([], ["9.9.9"])),
    TreeCase("images-with-no-id", tuple((i, "a") for i in IMAGE_IDS), _tree_rows(*IMAGE_IDS[:2]),
             check=_reports([IMAGE_IDS[2]], [])),
]


def write_tree(root: Path, files, pixels: np.ndarray | None = None) -> Path:
    """A DICOM tree under root: one small file per (ImageId, sub-folder), 32x48 unless `pixels` are given."""
    for image_id, folder in files:
        (root / folder).mkdir(parents=True, exist_ok=True)
        ds = factory.dataset(ramp(32, 48) if pixels is None else pixels, SOPInstanceUID=image_id)
        factory.save(ds, root / folder / f"{image_id}.dcm")
    return root

# ------------------------------------------------------------------------------------------------ configs


@dataclasses.dataclass(frozen=True)
class ConfigCase:
    """A config given as a mapping (`from_dict`), as overrides, or as a file; it must fail with ConfigError
    naming `names` (the key or file) and matching `error`."""

    name: str
    values: dict | None = None
    overrides: tuple[str, ...] = ()
    file_text: str | None = None
    error: str = ""
    names: str = ""


CONFIG_CASES = [
    ConfigCase("unknown-section", values={"trian": {"epochs": 1}}, error="unknown config key", names="'trian'"),
    ConfigCase("unknown-key", values={"train": {"batchsize": 8}}, error="unknown config key",
               names="'train.batchsize'"),
    ConfigCase("wrong-type", values={"train": {"epochs": "ten"}}, error="does not fit the type",
               names="'train.epochs'"),
    ConfigCase("scalar-for-a-section", values={"data": 3}, error="is a section", names="'data'"),
    ConfigCase("list-for-a-number", values={"optim": {"lr": [0.1]}}, error="does not fit", names="'optim.lr'"),
    ConfigCase("override-unknown-key", overrides=("--config.model.encodr=resnet18",), error="unknown config key",
               names="'model.encodr'"),
    ConfigCase("override-wrong-type", overrides=("--config.train.batch_size=big",), error="does not fit",
               names="'train.batch_size'"),
    ConfigCase("override-without-value", overrides=("--config.train.epochs",), error="Missing value for flag",
               names="--config.train.epochs"),
    ConfigCase("override-unknown-section", overrides=("--config.nope.x=1",), error="unknown config key",
               names="'nope.x'"),
    ConfigCase("file-without-get-config", file_text="CONFIG = {}\n", error="defines no get_config", names="config.py"),
    ConfigCase("file-with-unknown-key", file_text="def get_config(arg=None):\n    return {'train': {'epoch': 1}}\n",
               error="unknown config key", names="'train.epoch'"),
    ConfigCase("missing-file", error="not found", names="missing.py"),
]

# ------------------------------------------------------------------------------------------------ workdirs


@dataclasses.dataclass(frozen=True)
class WorkdirCase:
    """A workdir training cannot write to; `train_and_evaluate` must fail with OSError `error` naming `names`
    (relative to the workdir) before a training step. `prepare` makes the workdir and returns it."""

    name: str
    prepare: Callable[[Path], Path]
    error: str
    names: str


def _below_a_file(folder: Path) -> Path:
    (folder / "a-file").write_text("not a folder")
    return folder / "a-file" / "run"


def _on_a_full_disk(folder: Path) -> Path:
    """Linux's /dev/full fails every write with ENOSPC, as a full disk does, also for root (unlike permissions)."""
    workdir = folder / "run"
    workdir.mkdir()
    (workdir / "skipped.csv").symlink_to("/dev/full")
    return workdir


WORKDIR_CASES = [
    WorkdirCase("below-a-regular-file", _below_a_file, error="Not a directory", names=""),
    WorkdirCase("full-disk", _on_a_full_disk, error="No space left on device", names="skipped.csv"),
]

CORPUS = DICOM_CASES + LABEL_CASES + TREE_CASES + CONFIG_CASES + WORKDIR_CASES

