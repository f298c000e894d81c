"""`siim-jax prepare DATA --size N --out DIR`: the challenge tree decoded once into a TFDS cache at the training size
(siim_jax.data.tfds_siim)."""

from __future__ import annotations

import argparse
from pathlib import Path

from siim_jax.data.layout import TEST_DIR, TRAIN_CSV, TRAIN_DIR
from siim_jax.data.tfds_siim import prepare, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help=f"the challenge tree ({TRAIN_DIR}/, {TRAIN_CSV}, {TEST_DIR}/)")
    parser.add_argument("--size", type=int, default=512, help="training size in pixels (default 512)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the prepared datasets (TFDS data_dir)")
    parser.add_argument("--labels", type=Path, help=f"label CSV (default DATA_DIR/{TRAIN_CSV})")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")


def run(args: argparse.Namespace) -> int:
    builder = prepare(args.data_dir, args.size, args.out, labels_csv=args.labels, workers=args.workers)
    print(f"prepared {args.data_dir} at {args.size}x{args.size} in {builder.data_dir}")
    print(report(builder))
    return 0
