"""Argument groups that several commands share, and their translation into library calls."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from siim_jax import config_utils
from siim_jax.data import pipeline
from siim_jax.evaluation.evaluate import labelled_data
from siim_jax.inference.ensemble import Ensemble, load_inference
from siim_jax.inference.predictor import DTYPES, ON_ERROR, Inference, default_compilation_cache, use_compilation_cache


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str], default: str | None = None
) -> argparse.Namespace:
    """`parser.parse_args(argv)` with `args.config` the ConfigDict of `--config` and its overrides (parsed by
    config_flags, which argparse cannot declare); a config error exits with status 2, as argparse's do."""
    try:
        config, rest = config_utils.parse_config_flags(argv, default)
    except config_utils.ConfigError as error:
        parser.error(str(error))
    args = parser.parse_args(rest)
    if config is None:
        parser.error(f"--{config_utils.CONFIG_FLAG} is required: a packaged recipe "
                     f"({', '.join(config_utils.packaged_configs())}) or a file")
    args.config = config
    return args


def add_config_argument(parser: argparse.ArgumentParser, help_prefix: str = "") -> None:
    # Parsed by config_flags (parse_args_with_config); declared here for --help.
    parser.add_argument(
        "--config", metavar="NAME[:ARG]",
        help=f"{help_prefix}a packaged recipe ({', '.join(config_utils.packaged_configs())}) or a config file "
        "PATH.py[:ARG]; override its fields with --config.a.b=value",
    )


def workers(text: str) -> int | str:
    return text if text == "auto" else int(text)


def add_averaging_arguments(group) -> None:
    """--average-top K / --average-last K, into a mutually exclusive group of checkpoint choices."""
    group.add_argument("--average-top", type=int, default=0, metavar="K",
                       help="average the parameters and BatchNorm statistics of the K best steps (by validation "
                            "dice_pp)")
    group.add_argument("--average-last", type=int, default=0, metavar="K",
                       help="average the parameters and BatchNorm statistics of the K latest steps (kept by "
                            "train.keep_last)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and inference flags that `predict`, `tune` and `evaluate` share."""
    parser.add_argument("--checkpoint", action="append", type=Path,
                        help="training workdir or converted model directory; repeated: an ensemble of them, "
                             "each with the options below")
    parser.add_argument("--ensemble", type=Path, metavar="JSON",
                        help="an ensemble file listing members with their own options (see siim_jax.inference."
                             "ensemble)")
    add_weights_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per batch over all devices, rounded up to a multiple of the device count (8)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                        help="horizontal-flip test-time augmentation (on)")
    parser.add_argument("--workers", type=workers, default="auto",
                        help="processes decoding DICOMs: a count (0: one background thread) or 'auto' (default: "
                             f"the cores this process may use less one, at most {pipeline.MAX_AUTO_WORKERS})")
    parser.add_argument("--on-error", choices=ON_ERROR, default="empty",
                        help="a missing or unreadable DICOM: predict it empty with a warning, or fail (empty)")
    parser.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: the checkpoint's model.dtype)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--compilation-cache", type=Path, default=default_compilation_cache(), metavar="DIR",
                       help="persistent cache of compiled functions (default: %(default)s)")
    cache.add_argument("--no-compilation-cache", dest="compilation_cache", action="store_const", const=None,
                       help="compile afresh and keep nothing")


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """Which saved weights of a training run, and the input size: the flags `predict` and `export` share."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="this saved step (default: the latest)")
    which.add_argument("--best", action="store_true",
                       help="the step with the best validation Dice after post-processing (dice_pp)")
    add_averaging_arguments(which)
    parser.add_argument("--image-size", type=int,
                        help="model input size (default: the checkpoint's config.data.image_size)")


def inference_from_args(args: argparse.Namespace) -> Inference | Ensemble:
    """The `Inference` (one --checkpoint) or `Ensemble` (several, or --ensemble) that the flags of
    `add_model_arguments` name, compiling through the persistent cache they name."""
    use_compilation_cache(args.compilation_cache)
    try:
        return load_inference(
            args.checkpoint or [], args.ensemble, step=args.step, best=args.best, average_top=args.average_top,
            average_last=args.average_last,
            image_size=args.image_size, batch_size=args.batch_size, tta=args.tta, workers=args.workers,
            on_error=args.on_error, dtype=args.dtype,
        )
    except ValueError as error:
        raise SystemExit(str(error)) from error


def add_overlay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overlays", type=Path, metavar="DIR", help="write PNGs of the contours into DIR")
    parser.add_argument("--overlay-count", type=int, default=0, metavar="N",
                        help="draw a seeded sample of N images (default 0: every image)")


def add_labelled_data_arguments(parser: argparse.ArgumentParser, fold_help: str) -> None:
    """--data/--labels/--fold, shared by `tune` and `evaluate`; defaults come from the checkpoint's training config."""
    parser.add_argument("--data", type=Path,
                        help="folder of labelled DICOMs (default: the training config's dicom-images-train)")
    parser.add_argument("--labels", type=Path, help="label CSV (default: the training config's label file)")
    parser.add_argument("--fold", type=int, help=fold_help)


def labelled_data_from_args(
    args: argparse.Namespace, config: ml_collections.ConfigDict
) -> tuple[Path, Path, ml_collections.ConfigDict | None]:
    """`evaluation.evaluate.labelled_data` of the flags, exiting with its reason when the config names no data."""
    try:
        return labelled_data(config, args.data, args.labels)
    except ValueError as error:
        raise SystemExit(str(error)) from error
