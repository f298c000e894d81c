import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from siim_jax.data.dicom import DicomError, read_dicom

from . import dicom_factory as factory
from .conftest import REAL_DICOM


def _gradient(height=48, width=64, dtype=np.uint8, top=255):
    values = np.linspace(0, top, height * width).reshape(height, width)
    return values.astype(dtype)


def test_real_challenge_dicom(siim_real):
    image = read_dicom(REAL_DICOM)
    assert image.pixels.shape == (1024, 1024) and image.pixels.dtype == np.uint8
    assert image.image_id == REAL_DICOM.stem
    assert image.original_size == (1024, 1024)
    assert (image.sex, image.age, image.view) == ("M", 62, "PA")
    ds = pydicom.dcmread(REAL_DICOM)
    raw = np.asarray(Image.open(io.BytesIO(next(generate_frames(ds.PixelData, number_of_frames=1)))))
    np.testing.assert_array_equal(image.pixels, raw)  # same decoder: identical to the pixel
    reference = ds.pixel_array  # pydicom's own choice of decoder: within 1 grey level
    assert np.abs(image.pixels.astype(int) - reference.astype(int)).max() <= 1


def test_monochrome1_is_inverted(siim_real):
    normal = read_dicom(REAL_DICOM).pixels.astype(int)
    inverted = read_dicom(siim_real / "Fake_MONOHR1.dcm").pixels.astype(int)
    assert np.abs(inverted - (255 - normal)).max() <= 1


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_real_file(siim_real, tmp_path, cut):
    data = REAL_DICOM.read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(DicomError) as info:
        read_dicom(path)
    assert str(path) in str(info.value)


def test_garbage_bytes_in_jpeg(siim_real, tmp_path):
    data = bytearray(REAL_DICOM.read_bytes())
    data[-60000:-100] = np.random.default_rng(0).integers(0, 256, 59900, dtype=np.uint8).tobytes()
    path = tmp_path / "garbled.dcm"
    path.write_bytes(bytes(data))
    with pytest.raises(DicomError, match="garbled.dcm"):
        read_dicom(path)


def test_uncompressed_rle_and_jpeg_8bit(tmp_path):
    pixels = _gradient()
    plain = read_dicom(factory.save(factory.dataset(pixels), tmp_path / "plain.dcm"))
    np.testing.assert_array_equal(plain.pixels, pixels)
    rle = read_dicom(factory.save(factory.rle_dataset(pixels), tmp_path / "rle.dcm"))
    np.testing.assert_array_equal(rle.pixels, pixels)
    jpeg = read_dicom(factory.save(factory.jpeg_dataset(pixels), tmp_path / "jpeg.dcm"))
    assert np.abs(jpeg.pixels.astype(int) - pixels).max() <= 3  # lossy
    assert (plain.sex, plain.age, plain.view, plain.patient_id) == ("F", 45, "PA", "patient-1")


def test_16bit_monochrome1_window_matches_pydicom(tmp_path):
    stored = _gradient(dtype=np.uint16, top=4095)
    ds = factory.dataset(stored, photometric="MONOCHROME1", BitsStored=12, WindowCenter=2048, WindowWidth=2000)
    path = factory.save(ds, tmp_path / "window.dcm")
    image = read_dicom(path)
    reference_ds = pydicom.dcmread(path)
    windowed = apply_voi_lut(apply_modality_lut(reference_ds.pixel_array, reference_ds), reference_ds)
    expected = 255 - np.round(windowed / 4095 * 255)
    assert image.pixels.dtype == np.uint8
    assert np.abs(image.pixels.astype(int) - expected).max() <= 1


def test_16bit_voi_lut_sequence(tmp_path):
    stored = _gradient(dtype=np.uint16, top=1023)
    ds = factory.dataset(stored, BitsStored=10)
    item = pydicom.Dataset()
    lut = [int(v) for v in np.sqrt(np.arange(1024) / 1023 * 255**2)]
    item.add_new("LUTDescriptor", "US", [1024, 0, 8])
    item.add_new("LUTData", "US", lut)
    ds.VOILUTSequence = [item]
    image = read_dicom(factory.save(ds, tmp_path / "lut.dcm"))
    expected = np.asarray(lut)[stored]
    assert np.abs(image.pixels.astype(int) - expected).max() <= 1


def test_16bit_without_window_uses_value_range(tmp_path):
    stored = (_gradient(dtype=np.uint16, top=1000) + 3000).astype(np.uint16)
    image = read_dicom(factory.save(factory.dataset(stored), tmp_path / "range.dcm"))
    assert image.pixels.min() == 0 and image.pixels.max() == 255


def test_rgb_to_grey(tmp_path):
    rgb = np.zeros((16, 20, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[..., 2] = 50
    image = read_dicom(factory.save(factory.dataset(rgb, photometric="RGB"), tmp_path / "rgb.dcm"))
    assert image.pixels.shape == (16, 20)
    assert abs(int(image.pixels[0, 0]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1


@pytest.mark.parametrize("shape", [(512, 512), (37, 91)])
def test_any_size_keeps_original_size(tmp_path, shape):
    image = read_dicom(factory.save(factory.dataset(_gradient(*shape)), tmp_path / "size.dcm"))
    assert image.original_size == shape and image.pixels.shape == shape


def _no_pixels(tmp_path):
    ds = factory.dataset(_gradient())
    del ds.PixelData
    return factory.save(ds, tmp_path / "nopixels.dcm")


def _zero_size(tmp_path):
    ds = factory.dataset(_gradient())
    ds.Rows = 0
    ds.PixelData = b""
    return factory.save(ds, tmp_path / "zero.dcm")


def _png(tmp_path):
    path = tmp_path / "picture.dcm"
    Image.fromarray(_gradient()).save(path, format="PNG")
    return path


def _empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "make, reason",
    [
        (_no_pixels, "no pixel data"),
        (_zero_size, "zero-size"),
        (_png, "not a DICOM"),
        (_empty_file, "not a DICOM|unreadable"),
        (lambda tmp: factory.save(factory.unsupported_syntax_dataset(_gradient()), tmp / "jls.dcm"), "unsupported transfer syntax JPEG-LS"),
        (lambda tmp: tmp / "missing.dcm", "not found"),
    ],
)
def test_bad_files_raise_typed_error_naming_file(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(DicomError, match=reason) as info:
        read_dicom(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
