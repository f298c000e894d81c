import io
import re

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from siim_jax.data.dicom import DicomError, read_dicom

from . import dicom_factory as factory
from .conftest import REAL_DICOM


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
    pixels = factory.ramp(48, 64)
    plain = read_dicom(factory.save(factory.dataset(pixels), tmp_path / "plain.dcm"))
    np.testing.assert_array_equal(plain.pixels, pixels)
    rle = read_dicom(factory.save(factory.rle_dataset(pixels), tmp_path / "rle.dcm"))
    np.testing.assert_array_equal(rle.pixels, pixels)
    jpeg = read_dicom(factory.save(factory.jpeg_dataset(pixels), tmp_path / "jpeg.dcm"))
    assert np.abs(jpeg.pixels.astype(int) - pixels).max() <= 3  # lossy
    assert (plain.sex, plain.age, plain.view, plain.patient_id) == ("F", 45, "PA", "patient-1")


def test_16bit_monochrome1_window_matches_pydicom(tmp_path):
    stored = factory.ramp(48, 64, dtype=np.uint16, top=4095)
    ds = factory.dataset(stored, photometric="MONOCHROME1", BitsStored=12, WindowCenter=2048, WindowWidth=2000)
    path = factory.save(ds, tmp_path / "window.dcm")
    image = read_dicom(path)
    reference_ds = pydicom.dcmread(path)
    windowed = apply_voi_lut(apply_modality_lut(reference_ds.pixel_array, reference_ds), reference_ds)
    expected = 255 - np.round(windowed / 4095 * 255)
    assert image.pixels.dtype == np.uint8
    assert np.abs(image.pixels.astype(int) - expected).max() <= 1


def test_16bit_voi_lut_sequence(tmp_path):
    stored = factory.ramp(48, 64, dtype=np.uint16, top=1023)
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
    stored = (factory.ramp(48, 64, dtype=np.uint16, top=1000) + 3000).astype(np.uint16)
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
    image = read_dicom(factory.save(factory.dataset(factory.ramp(*shape)), tmp_path / "size.dcm"))
    assert image.original_size == shape and image.pixels.shape == shape


# Bad files (empty, PNG, no pixel data, zero rows, unsupported syntax, missing, ...) are cases of the corpus in
# tests/bad_inputs.py, which test_reliability_inputs.py checks through read_header and read_dicom.


# ------------------------------------------------------------------- every transfer syntax against pydicom's decoding

_RNG = np.random.default_rng(0)
# Noise over a gradient: smooth enough for lossy codecs to keep, rough enough to exercise every code path.
_MONO8 = np.clip(factory.ramp(40, 56).astype(int) + _RNG.integers(-8, 9, (40, 56)), 0, 255).astype(np.uint8)
_MONO12 = (_MONO8.astype(np.uint16) * 16 + _RNG.integers(0, 16, _MONO8.shape)).astype(np.uint16)
_RGB = np.stack([_MONO8, 255 - _MONO8, np.roll(_MONO8, 7, axis=1)], axis=-1)


def _built(make):
    return lambda tmp: factory.save(make(), tmp / "image.dcm")


def _sample(name):
    return lambda tmp: factory.sample(name)


# (id, build, tolerance): lossy codecs within 1 grey level of pydicom's decoding, lossless ones exactly.
SYNTAX_CASES = [
    ("uncompressed-mono", _built(lambda: factory.dataset(_MONO12, BitsStored=12)), 0),
    ("uncompressed-rgb", _built(lambda: factory.dataset(_RGB, photometric="RGB")), 0),
    ("uncompressed-ybr-full-422", _sample("SC_ybr_full_422_uncompressed.dcm"), 0),
    ("uncompressed-palette", _sample("examples_palette.dcm"), 0),
    ("jpeg-baseline-mono", _built(lambda: factory.jpeg_dataset(_MONO8)), 1),
    ("jpeg-baseline-ybr-422", _built(lambda: factory.jpeg_dataset(_RGB)), 1),
    ("jpeg-baseline-rgb-no-colour-transform", _sample("SC_jpeg_no_color_transform.dcm"), 1),
    ("jpeg-baseline-rgb-adobe", _sample("SC_rgb_jpeg_app14_dcmd.dcm"), 1),
    ("jpeg-baseline-ybr-full", _sample("SC_rgb_dcmtk_+eb+cy+s4.dcm"), 1),
    ("jpeg-extended-8bit-mono", _built(lambda: factory.jpeg_dataset(_MONO8, extended=True)), 1),
    ("jpeg-extended-8bit-ybr", _built(lambda: factory.jpeg_dataset(_RGB, extended=True)), 1),
    ("jpeg-extended-12bit-mono", _sample("JPGExtended.dcm"), 1),
    ("jpeg-lossless-sv1-mono8", _built(lambda: factory.lossless_jpeg_dataset(_MONO8)), 0),
    ("jpeg-lossless-sv1-mono12", _built(lambda: factory.lossless_jpeg_dataset(_MONO12, bits_stored=12)), 0),
    ("jpeg-lossless-sv1-rgb", _sample("SC_rgb_jpeg_gdcm.dcm"), 0),
    ("jpeg-ls-lossless-mono8", _built(lambda: factory.compressed_dataset(_MONO8, JPEGLSLossless)), 0),
    ("jpeg-ls-lossless-mono12", _built(lambda: factory.compressed_dataset(_MONO12, JPEGLSLossless, 12)), 0),
    ("jpeg-ls-lossless-rgb", _built(lambda: factory.compressed_dataset(_RGB, JPEGLSLossless)), 0),
    ("jpeg-ls-near-lossless-mono",
     _built(lambda: factory.compressed_dataset(_MONO8, JPEGLSNearLossless, jls_error=2)), 1),
    ("jpeg-ls-near-lossless-rgb", _sample("SC_rgb_jls_lossy_line.dcm"), 1),
    ("jpeg-2000-lossless-mono8", _built(lambda: factory.compressed_dataset(_MONO8, JPEG2000Lossless)), 0),
    ("jpeg-2000-lossless-mono12", _built(lambda: factory.compressed_dataset(_MONO12, JPEG2000Lossless, 12)), 0),
    ("jpeg-2000-lossless-rgb", _built(lambda: factory.compressed_dataset(_RGB, JPEG2000Lossless)), 0),
    ("jpeg-2000-lossless-ybr-rct", _sample("GDCMJ2K_TextGBR.dcm"), 0),
    ("jpeg-2000-mono", _built(lambda: factory.compressed_dataset(_MONO12, JPEG2000, 12, j2k_psnr=[50])), 1),
    ("jpeg-2000-rgb", _sample("SC_rgb_gdcm_KY.dcm"), 1),
    ("jpeg-2000-signed-16bit", _sample("693_J2KI.dcm"), 1),
    ("rle-mono", _built(lambda: factory.compressed_dataset(_MONO12, RLELossless, 12)), 0),
    ("rle-rgb", _built(lambda: factory.compressed_dataset(_RGB, RLELossless)), 0),
    ("rle-rgb-16bit", _sample("SC_rgb_rle_16bit.dcm"), 0),
]


@pytest.mark.parametrize("build, tolerance", [case[1:] for case in SYNTAX_CASES],
                         ids=[case[0] for case in SYNTAX_CASES])
def test_every_transfer_syntax_matches_pydicom(tmp_path, build, tolerance):
    path = build(tmp_path)
    image = read_dicom(path)
    reference = factory.pydicom_reference(path)
    assert image.pixels.dtype == np.uint8 and image.pixels.shape == reference.shape
    assert np.abs(image.pixels.astype(int) - reference.astype(int)).max() <= tolerance


def test_colour_jpeg_never_takes_the_greyscale_path():
    """A JPEG Baseline file with PhotometricInterpretation RGB and no colour transform: Pillow alone reads its
    components as YCbCr (grey 176 at the corner where pydicom's RGB gives 244)."""
    path = factory.sample("SC_jpeg_no_color_transform.dcm")
    assert read_dicom(path).pixels[0, 0] == factory.pydicom_reference(path)[0, 0] == 244


# ------------------------------------------------------------------------------------------------- VOI and frames


def _windowed(function, **elements):
    return factory.dataset(_MONO12, BitsStored=12, WindowCenter=1800, WindowWidth=1500, VOILUTFunction=function,
                           **elements)


def _lut_item(entries=4096, first=0, bits=16):
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [entries, first, bits])
    item.add_new("LUTData", "US", [int(v) for v in (np.arange(entries) / (entries - 1)) ** 0.5 * (2**bits - 1)])
    return item


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_lut_function_matches_pydicom(tmp_path, function, photometric):
    ds = _windowed(function)
    ds.PhotometricInterpretation = photometric
    path = factory.save(ds, tmp_path / "window.dcm")
    linear = factory.pydicom_reference(factory.save(_windowed("LINEAR"), tmp_path / "linear.dcm"))
    reference = factory.pydicom_reference(path)
    np.testing.assert_array_equal(read_dicom(path).pixels, reference)
    if function == "SIGMOID":  # the function is followed, not ignored
        assert np.abs(reference.astype(int) - linear).max() > 10


def test_voi_lut_is_preferred_over_the_window(tmp_path):
    ds = _windowed("LINEAR")
    ds.VOILUTSequence = [_lut_item()]
    path = factory.save(ds, tmp_path / "both.dcm")
    expected = np.round(np.sqrt(_MONO12 / 4095) * 65535).astype(int) // 257  # the LUT, to within its rounding
    image = read_dicom(path)
    np.testing.assert_array_equal(image.pixels, factory.pydicom_reference(path))
    assert np.abs(image.pixels.astype(int) - expected).max() <= 1


def test_signed_rescaled_window_matches_pydicom(tmp_path):
    stored = (_MONO12.astype(np.int16) - 2048).astype(np.int16)
    ds = factory.dataset(stored.view(np.uint16), BitsStored=12, RescaleSlope=2, RescaleIntercept=-1000,
                         WindowCenter=-600, WindowWidth=3000)
    ds.PixelRepresentation = 1
    path = factory.save(ds, tmp_path / "signed.dcm")
    np.testing.assert_array_equal(read_dicom(path).pixels, factory.pydicom_reference(path))


def test_invalid_window_names_the_file(tmp_path):
    path = factory.save(_windowed("SIGMOID"), tmp_path / "bad-window.dcm")
    ds = pydicom.dcmread(path)
    ds.WindowWidth = 0
    ds.save_as(path)
    with pytest.raises(DicomError, match="Window Width") as info:
        read_dicom(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    "build",
    [
        _built(lambda: _two_frame_jpeg()),
        _sample("SC_rgb_rle_2frame.dcm"),
        _sample("examples_ybr_color.dcm"),
    ],
    ids=["jpeg-mono-2-frames", "rle-rgb-2-frames", "jpeg-ybr-30-frames"],
)
def test_multi_frame_gives_the_first_frame_with_a_warning(tmp_path, build):
    path = build(tmp_path)
    with pytest.warns(UserWarning, match=re.escape(str(path)) + ".*first"):
        image = read_dicom(path)
    reference = factory.pydicom_reference(path)
    assert np.abs(image.pixels.astype(int) - reference.astype(int)).max() <= 1


def _two_frame_jpeg():
    first, second = factory.jpeg_dataset(_MONO8), factory.jpeg_dataset(255 - _MONO8)
    frames = [next(generate_frames(ds.PixelData, number_of_frames=1)) for ds in (first, second)]
    first.PixelData = encapsulate(frames)
    first.NumberOfFrames = 2
    return first


def _lut_sequence_item(entries: int, first: int, bits: int, data: np.ndarray) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [entries, first, bits])
    item.add_new("LUTData", "US", [int(v) for v in data])
    return item


_RAMP8 = factory.ramp(48, 64)
# The transforms an 8-bit JPEG (the challenge's format, decoded by Pillow) may carry: each must leave the fast path.
_FAST_PATH_TRANSFORMS = {
    "window": {"WindowCenter": 100, "WindowWidth": 80},
    "rescaled window": {"RescaleSlope": 2, "RescaleIntercept": -40, "WindowCenter": 160, "WindowWidth": 200},
    # an 8-bit VOI LUT whose first mapped value is 20: stored values below it take the first entry
    "voi lut": {"VOILUTSequence": [_lut_sequence_item(200, 20, 8, 255 * (np.arange(200) / 199) ** 2)]},
    # a 16-bit modality LUT, mapping stored values to a curve that a plain rescale cannot give
    "modality lut": {"ModalityLUTSequence": [_lut_sequence_item(256, 0, 16, 65535 * (np.arange(256) / 255) ** 0.5)]},
    "modality lut then window": {
        "ModalityLUTSequence": [_lut_sequence_item(256, 0, 16, 65535 * (np.arange(256) / 255) ** 0.5)],
        "WindowCenter": 40000, "WindowWidth": 24000,
    },
}


@pytest.mark.parametrize("transform", list(_FAST_PATH_TRANSFORMS))
def test_8bit_jpeg_fast_path_applies_the_files_transforms_as_pydicom_does(tmp_path, transform):
    plain = factory.jpeg_dataset(_RAMP8)
    decoded = read_dicom(factory.save(plain, tmp_path / "plain.dcm")).pixels  # Pillow's values, untransformed
    ds = factory.jpeg_dataset(_RAMP8)
    for keyword, value in _FAST_PATH_TRANSFORMS[transform].items():
        setattr(ds, keyword, value)
    image = read_dicom(factory.save(ds, tmp_path / "transformed.dcm"))
    expected = factory.pydicom_grey(pydicom.dcmread(tmp_path / "transformed.dcm"), decoded)
    np.testing.assert_array_equal(image.pixels, expected)
    assert np.abs(expected.astype(int) - decoded).max() > 20  # the transform changes the picture


@pytest.mark.parametrize("bits", [8, 16])
def test_voi_lut_whose_first_mapped_value_is_not_zero_matches_pydicom(tmp_path, bits):
    first, entries = 1000, 2000  # stored 12-bit values below 1000 take the first entry, above 2999 the last
    ds = factory.dataset(_MONO12, BitsStored=12)
    ds.VOILUTSequence = [_lut_sequence_item(entries, first, bits,
                                            (2**bits - 1) * (np.arange(entries) / (entries - 1)) ** 0.5)]
    path = factory.save(ds, tmp_path / "lut.dcm")
    image = read_dicom(path)
    reference_ds = pydicom.dcmread(path)
    lut = np.asarray(reference_ds.VOILUTSequence[0].LUTData, np.float64)
    by_hand = lut[np.clip(_MONO12.astype(int), first, first + entries - 1) - first]  # PS3.3 C.11.2.1.1
    np.testing.assert_array_equal(image.pixels, np.round(by_hand / (2**bits - 1) * 255).astype(np.uint8))
    if bits == 16:  # pydicom's apply_voi_lut indexes 8-bit LUTs through uint8 (wrapping past 255): 16 bits only
        np.testing.assert_array_equal(image.pixels, factory.pydicom_reference(path))
