"""Measures the data-format hot paths against their peers, in one run.

- DICOM: `read_dicom` on a 1024² JPEG Baseline DICOM against raw Pillow decoding of the same JPEG bytes
  (the floor) and against pydicom's default `pixel_array` (what a seed-style loader does).
- DICOM transfer syntaxes: the challenge image (colour: three shifted copies of it; 12-bit: it times 16 plus
  noise) written in every syntax read_dicom decodes, and decoded by read_dicom, by pydicom's default and by each
  of pydicom's installed plugins, in ms per 1024² image with the ratio to pydicom's default in the same run.
  12-bit JPEG Extended has no encoder here: pydicom's own JPGExtended.dcm (1024x256) stands in, scaled to 1024².
- RLE: decode + re-encode of every row of the real label file.

Usage: python tools/bench_formats.py [--dicom FILE] [--labels CSV] [--repeat N] [--syntax-repeat N]
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from siim_jax.data import rle
from siim_jax.data.dicom import read_dicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's DICOM factory writes the files of every transfer syntax
from tests import dicom_factory as factory  # noqa: E402

SHARED = ROOT.parent / "shared" / "siim-real"


def _best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def bench_dicom(path: Path, repeat: int) -> dict:
    jpeg = next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    pillow_ms = _best_ms(lambda: np.asarray(Image.open(io.BytesIO(jpeg))), repeat)
    ours_ms = _best_ms(lambda: read_dicom(path), repeat)
    pydicom_ms = _best_ms(lambda: pydicom.dcmread(path).pixel_array, repeat)
    return {
        "pillow_raw_ms": pillow_ms,
        "read_dicom_ms": ours_ms,
        "pydicom_pixel_array_ms": pydicom_ms,
        "read_dicom_over_pillow": ours_ms / pillow_ms,
        "pydicom_over_read_dicom": pydicom_ms / ours_ms,
    }


def _syntax_files(real: Path, folder: Path) -> dict[str, tuple[str, float]]:
    """{case: (path, pixels in the file / 1024²)} for every transfer syntax, built from the challenge image."""
    mono8 = read_dicom(real).pixels
    mono12 = mono8.astype(np.uint16) * 16 + np.random.default_rng(0).integers(0, 16, mono8.shape, dtype=np.uint16)
    rgb = np.stack([mono8, np.roll(mono8, 64, axis=1), 255 - mono8], axis=-1)
    builders = {
        "Explicit VR Little Endian, mono 12-bit": lambda: factory.dataset(mono12, BitsStored=12),
        "JPEG Baseline, YBR_FULL_422": lambda: factory.jpeg_dataset(rgb),
        "JPEG Extended, mono 8-bit": lambda: factory.jpeg_dataset(mono8, extended=True),
        "JPEG Lossless SV1, mono 8-bit": lambda: factory.lossless_jpeg_dataset(mono8),
        "JPEG Lossless SV1, mono 12-bit": lambda: factory.lossless_jpeg_dataset(mono12, bits_stored=12),
        "JPEG-LS Lossless, mono 8-bit": lambda: factory.compressed_dataset(mono8, JPEGLSLossless),
        "JPEG-LS Lossless, mono 12-bit": lambda: factory.compressed_dataset(mono12, JPEGLSLossless, 12),
        "JPEG-LS Near-Lossless, mono 8-bit": lambda: factory.compressed_dataset(mono8, JPEGLSNearLossless, jls_error=2),
        "JPEG-LS Lossless, RGB": lambda: factory.compressed_dataset(rgb, JPEGLSLossless),
        "JPEG 2000 Lossless, mono 8-bit": lambda: factory.compressed_dataset(mono8, JPEG2000Lossless),
        "JPEG 2000 Lossless, mono 12-bit": lambda: factory.compressed_dataset(mono12, JPEG2000Lossless, 12),
        "JPEG 2000, mono 12-bit": lambda: factory.compressed_dataset(mono12, JPEG2000, 12, j2k_psnr=[50]),
        "JPEG 2000 Lossless, RGB": lambda: factory.compressed_dataset(rgb, JPEG2000Lossless),
        "RLE Lossless, mono 12-bit": lambda: factory.compressed_dataset(mono12, RLELossless, 12),
        "RLE Lossless, RGB": lambda: factory.compressed_dataset(rgb, RLELossless),
    }
    files = {"JPEG Baseline, mono 8-bit (challenge file)": (str(real), 1.0)}
    for index, (case, build) in enumerate(builders.items()):
        files[case] = (factory.save(build(), folder / f"{index}.dcm"), 1.0)
    extended = factory.sample("JPGExtended.dcm")
    ds = pydicom.dcmread(extended, stop_before_pixels=True)
    files["JPEG Extended, mono 12-bit (pydicom's sample)"] = (extended, ds.Rows * ds.Columns / 1024**2)
    return files


def _pydicom_decode(path: str, plugin: str = "") -> np.ndarray:
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin=plugin)
    return ds.pixel_array


def bench_syntaxes(real: Path, repeat: int) -> list[dict]:
    """One row per (file, decoder): ms per 1024² image (reading the file included) and the ratio to pydicom's
    default decoder timed in the same run."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for case, (path, size) in _syntax_files(real, Path(folder)).items():
            syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
            default_ms = _best_ms(lambda path=path: _pydicom_decode(path), repeat) / size
            decoders = {"read_dicom": lambda path=path: read_dicom(path)}
            for plugin in get_decoder(syntax).available_plugins:
                decoders[f"pydicom+{plugin}"] = lambda path=path, plugin=plugin: _pydicom_decode(path, plugin)
            rows.append({"case": case, "decoder": "pydicom default", "ms": default_ms, "over_pydicom": 1.0})
            for name, decode in decoders.items():
                try:
                    ms = _best_ms(decode, repeat) / size
                except Exception as exc:  # a plugin that cannot handle this file (12-bit JPEG in Pillow)
                    rows.append({"case": case, "decoder": name, "ms": None, "error": f"{type(exc).__name__}"})
                    continue
                rows.append({"case": case, "decoder": name, "ms": ms, "over_pydicom": ms / default_ms})
    return rows


def _print_syntax_table(rows: list[dict]) -> None:
    print(f"{'transfer syntax, image':48} {'decoder':18} {'ms/1024²':>9} {'/pydicom':>9}")
    for row in rows:
        figures = (f"{row['ms']:9.1f} {row['over_pydicom']:9.2f}" if row["ms"] is not None
                   else f"{'fails':>9} ({row['error']})")
        print(f"{row['case']:48} {row['decoder']:18} {figures}")


def bench_rle(labels: Path) -> dict:
    with gzip.open(labels, "rt") if labels.suffix == ".gz" else open(labels) as handle:
        next(handle)
        rows = [line.rstrip("\n").split(",", 1)[1].strip() for line in handle]
    start = time.perf_counter()
    for text in rows:
        if rle.encode(rle.decode(text)) != text:
            raise AssertionError(f"round trip failed for {text[:40]}")
    seconds = time.perf_counter() - start
    return {"rle_rows": len(rows), "rle_roundtrip_s": seconds, "rle_us_per_row": 1e6 * seconds / len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample_dicom = SHARED / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    parser.add_argument("--dicom", type=Path, default=sample_dicom)
    parser.add_argument("--labels", type=Path, default=SHARED / "siim-pneumothorax-train-rle.csv.gz")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--syntax-repeat", type=int, default=5, help="decodes per (syntax, decoder); 0 skips them")
    args = parser.parse_args()
    figures = {**bench_dicom(args.dicom, args.repeat), **bench_rle(args.labels)}
    if args.syntax_repeat:
        figures["syntaxes"] = bench_syntaxes(args.dicom, args.syntax_repeat)
        _print_syntax_table(figures["syntaxes"])
    print(f"read_dicom {figures['read_dicom_ms']:.2f} ms vs raw Pillow {figures['pillow_raw_ms']:.2f} ms "
          f"(ratio {figures['read_dicom_over_pillow']:.2f}); "
          f"pydicom pixel_array {figures['pydicom_pixel_array_ms']:.2f} ms")
    print(f"RLE decode+encode of {figures['rle_rows']} rows: {figures['rle_roundtrip_s']:.2f} s "
          f"({figures['rle_us_per_row']:.0f} us/row)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
