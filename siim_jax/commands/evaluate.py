"""`siim-jax evaluate`: challenge metrics of a checkpoint (or an ensemble) on labelled images.

    siim-jax evaluate --checkpoint DIR --data DICOM_DIR --labels CSV [--fold K] --out per_image.csv

Masks are predicted exactly as `predict` writes them and compared with the merged label masks at the original
size (siim_jax.evaluation.evaluate); prints the summary and writes the per-image CSV and, with --overlays, pictures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from siim_jax.commands.arguments import (
    add_labelled_data_arguments,
    add_model_arguments,
    add_overlay_arguments,
    inference_from_args,
    labelled_data_from_args,
)
from siim_jax.evaluation.evaluate import PER_IMAGE_COLUMNS, evaluate_images, format_summary, labelled_frame, summarise
from siim_jax.inference.overlays import OverlayWriter, overlay_sample
from siim_jax.inference.postprocess import PostProcess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_labelled_data_arguments(parser, "evaluate this fold of the training folds only (default: every image)")
    parser.add_argument("--out", required=True, type=Path, help="per-image CSV to write")
    parser.add_argument("--postprocess", type=Path, metavar="JSON", help="from `siim-jax tune` (default: 0.5)")
    add_overlay_arguments(parser)
    parser.add_argument("--sheet-size", type=int, default=8, metavar="N",
                        help="with --overlays: best and worst N cases in contact_sheet.png (8)")


def run(args: argparse.Namespace) -> int:
    postprocess = PostProcess.from_json(args.postprocess) if args.postprocess else PostProcess()
    inference = inference_from_args(args)
    dicom_dir, labels, data_config = labelled_data_from_args(args, inference.config)
    frame = labelled_frame(dicom_dir, labels, args.fold, data_config)
    overlays = None
    if args.overlays:
        sample = overlay_sample(len(frame), args.overlay_count)
        overlays = OverlayWriter(args.overlays, sample=sample, sheet_size=args.sheet_size)
    table = evaluate_images(inference, frame, postprocess, overlays)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table[list(PER_IMAGE_COLUMNS)].to_csv(args.out, index=False)
    print(format_summary(summarise(table)))
    print(f"wrote {args.out}")
    if overlays is not None:
        sheet = overlays.finish()
        print(f"wrote {len(overlays.written)} overlays" + (f" and {sheet}" if sheet else "") + f" in {args.overlays}")
    return 0
