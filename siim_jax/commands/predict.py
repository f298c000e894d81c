"""`siim-jax predict`: a submission CSV (and overlays) from a checkpoint or an ensemble.

    siim-jax predict --checkpoint DIR [--step N | --best | --average-top K] --data DICOM_DIR --out submission.csv

A missing or unreadable DICOM becomes a `-1` row and a warning naming it (`--on-error empty`, the default) or stops
the run (`--on-error fail`). `--dicom-seg DIR` also writes a DICOM Segmentation of each non-empty final mask
(siim_jax.inference.dicom_seg). Compiled functions are kept in a persistent cache (`--compilation-cache DIR`, default
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
    parser.add_argument("--dicom-seg", type=Path, metavar="DIR",
                        help="write a DICOM Segmentation of each non-empty final mask into DIR")
    parser.add_argument("--dicom-seg-empty", action="store_true",
                        help="with --dicom-seg: write one for each empty mask as well")


def run(args: argparse.Namespace) -> int:
    if args.dicom_seg_empty and not args.dicom_seg:
        raise SystemExit("--dicom-seg-empty needs --dicom-seg DIR")
    postprocess = PostProcess.from_json(args.postprocess) if args.postprocess else PostProcess()
    items = submission_items(args.data, args.sample_submission)
    inference = inference_from_args(args)
    overlays = None
    if args.overlays:
        overlays = OverlayWriter(args.overlays, sample=overlay_sample(len(items), args.overlay_count))
    dicom_seg = None
    if args.dicom_seg:
        from siim_jax.inference.dicom_seg import DicomSegWriter  # highdicom only when it is asked for

        dicom_seg = DicomSegWriter(args.dicom_seg, empty=args.dicom_seg_empty)
    expected = [image_id for image_id, _ in items] if args.sample_submission else None
    summary = predict_submission(inference, items, args.out, postprocess, expected, overlays, dicom_seg)
    print(summary.report())
    print(f"wrote {args.out}" + (f" and {len(overlays.written)} overlays in {args.overlays}" if overlays else ""))
    if dicom_seg is not None:
        failed = f"; {len(dicom_seg.failed)} sources got none (see the warnings)" if dicom_seg.failed else ""
        print(f"wrote {len(dicom_seg.written)} DICOM Segmentations in {args.dicom_seg}{failed}")
    return 0
