"""`siim-jax synth OUT`: writes a synthetic dataset in the challenge's layout (siim_jax.data.synthetic)."""

from __future__ import annotations

import argparse
from pathlib import Path

from siim_jax.data.synthetic.anatomy import IMAGE_SIZE
from siim_jax.data.synthetic.patients import DEFAULT_POSITIVE_FRACTION
from siim_jax.data.synthetic.rendering import DEFAULT_DIFFICULTY
from siim_jax.data.synthetic.writing import generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="new (or empty) folder to write the dataset into")
    parser.add_argument("--n-train", type=int, default=100, help="training images (default 100)")
    parser.add_argument("--n-test", type=int, default=20, help="test images (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--mask-source", type=Path, help="label CSV(.gz) whose positive rows supply the masks")
    parser.add_argument(
        "--difficulty", type=float, default=DEFAULT_DIFFICULTY,
        help=f"0 = obvious .. 1 = no darkening nor pleural line, markings still absent (default {DEFAULT_DIFFICULTY})",
    )
    parser.add_argument("--positive-fraction", type=float, default=DEFAULT_POSITIVE_FRACTION, help="default 0.22")
    parser.add_argument("--stage2", action="store_true", help="also write stage_2_train.csv (train + test labels)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"),
                       help=f"Rows and Columns of every image (default {IMAGE_SIZE} {IMAGE_SIZE})")
    shape.add_argument("--shapes", type=shape_list, metavar="HxW,...",
                       help="a mix of shapes, e.g. 96x128,128x96,128x128: image i of a split gets the (i mod n)-th")


def shape_list(text: str) -> list[tuple[int, int]]:
    """'96x128,128x96' -> [(96, 128), (128, 96)]: (Rows, Columns) pairs."""
    try:
        shapes = [tuple(int(size) for size in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise argparse.ArgumentTypeError(f"expected comma-separated HxW shapes such as 96x128,128x96, got {text!r}")
    return shapes


def run(args: argparse.Namespace) -> int:
    summary = generate(
        args.out, args.n_train, args.n_test, seed=args.seed, mask_source=args.mask_source,
        difficulty=args.difficulty, positive_fraction=args.positive_fraction, stage2=args.stage2,
        processes=args.processes, shapes=args.shapes or [tuple(args.shape or (IMAGE_SIZE, IMAGE_SIZE))],
    )
    print(
        f"wrote {len(summary.train_ids)} train ({summary.train_positives} positive) and {len(summary.test_ids)} test "
        f"({summary.test_positives} positive) images to {summary.out_dir} in {summary.elapsed_s:.1f} s "
        f"({summary.images_per_s:.1f} images/s)"
    )
    return 0
