"""`siim-jax predict`: a submission CSV (and overlays) from a checkpoint or an ensemble.

    siim-jax predict --checkpoint DIR [--step N | --best | --average-top K] --data DICOM_DIR --out submission.csv

A missing or unreadable DICOM becomes a `-1` row and a warning naming it (`--on-error empty`, the default) or stops
the run (`--on-error fail`). Compiled functions are kept in a persistent cache (`--compilation-cache DIR`, default
`$XDG_CACHE_HOME/siim-jax/jax`, else `~/.cache/siim-jax/jax`; `--no-compilation-cache` turns it off).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from siim_jax.commands.arguments import add_model_arguments, add_overlay_arguments, inference_from_args
from siim_jax.inference.overlays import OverlayWriter, overlay_sample
from siim_jax.inference.postprocess import PostProcess
from siim_jax.inference.submission import predict_submission, submission_items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="folder of test DICOMs (searched recursively)")
    parser.add_argument("--out", required=True, type=Path, help="submission CSV to write")
    parser.add_argument("--sample-submission", type=Path,
                        help="predict exactly its ImageIds and refuse to write a file that misses any")
    parser.add_argument("--postprocess", type=Path, metavar="JSON",
                        help="post-processing from `siim-jax tune` (default: threshold 0.5)")
    add_overlay_arguments(parser)


def run(args: argparse.Namespace) -> int:
    postprocess = PostProcess.from_json(args.postprocess) if args.postprocess else PostProcess()
    items = submission_items(args.data, args.sample_submission)
    inference = inference_from_args(args)
    overlays = None
    if args.overlays:
        overlays = OverlayWriter(args.overlays, sample=overlay_sample(len(items), args.overlay_count))
    expected = [image_id for image_id, _ in items] if args.sample_submission else None
    summary = predict_submission(inference, items, args.out, postprocess, expected, overlays)
    print(summary.report())
    print(f"wrote {args.out}" + (f" and {len(overlays.written)} overlays in {args.overlays}" if overlays else ""))
    return 0
