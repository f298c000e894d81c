"""Measures the data-format hot paths against their peers, in one run.

- DICOM: `read_dicom` on a 1024² JPEG Baseline DICOM against raw Pillow decoding of the same JPEG bytes
  (the floor) and against pydicom's default `pixel_array` (what a seed-style loader does).
- RLE: decode + re-encode of every row of the real label file.

Usage: python tools/bench_formats.py [--dicom FILE] [--labels CSV] [--repeat N]
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames

from siim_jax.data import rle
from siim_jax.data.dicom import read_dicom

SHARED = Path(__file__).resolve().parents[2] / "shared" / "siim-real"


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
    args = parser.parse_args()
    figures = {**bench_dicom(args.dicom, args.repeat), **bench_rle(args.labels)}
    print(f"read_dicom {figures['read_dicom_ms']:.2f} ms vs raw Pillow {figures['pillow_raw_ms']:.2f} ms "
          f"(ratio {figures['read_dicom_over_pillow']:.2f}); "
          f"pydicom pixel_array {figures['pydicom_pixel_array_ms']:.2f} ms")
    print(f"RLE decode+encode of {figures['rle_rows']} rows: {figures['rle_roundtrip_s']:.2f} s "
          f"({figures['rle_us_per_row']:.0f} us/row)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
