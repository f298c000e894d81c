"""`siim-jax export`: a checkpoint's model as ONNX or a StableHLO artifact (see siim_jax.inference.export)."""

from __future__ import annotations

import argparse
from pathlib import Path

from siim_jax.commands.arguments import add_weights_arguments
from siim_jax.inference import export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="training workdir or model directory")
    add_weights_arguments(parser)
    parser.add_argument("--format", choices=export.FORMATS, default="onnx",
                        help="ONNX (needs the 'export' extra) or a jax.export StableHLO artifact (onnx)")
    parser.add_argument("out", type=Path, help="file to write")


def run(args: argparse.Namespace) -> int:
    try:
        path = export.export_checkpoint(args.checkpoint, args.out, args.format, step=args.step, best=args.best,
                                        average_top=args.average_top, average_last=args.average_last,
                                        image_size=args.image_size)
    except (export.MissingExtraError, ValueError) as error:
        raise SystemExit(str(error)) from error
    print(f"wrote {path} ({args.format}, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0
