"""`siim-jax cv --config NAME[:ARG] --workdir W [--folds 0,1,2,3,4] [--best | --average-top K | --average-last K]`:
every fold trained, out-of-fold predictions and a summary of the folds (siim_jax.evaluation.cv)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from siim_jax.commands.arguments import add_averaging_arguments, add_config_argument, parse_args_with_config
from siim_jax.evaluation.cv import SUMMARY_CSV, SUMMARY_PNG, FoldInterrupted, run_cv
from siim_jax.evaluation.oof import OOF_FILE


def _fold_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"folds look like 0,1,2; got {text!r}") from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser, "the recipe of every fold: ")
    parser.add_argument("--workdir", required=True, type=Path, help="fold k trains into WORKDIR/fold_k")
    parser.add_argument("--folds", type=_fold_list, metavar="0,1,...",
                        help="the folds to train (default: all data.n_folds)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--best", action="store_true", help="out-of-fold predictions from each fold's best step")
    add_averaging_arguments(which)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    return parse_args_with_config(parser, argv)


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        table = run_cv(args.config, args.workdir, args.folds, best=args.best, average_top=args.average_top,
                       average_last=args.average_last)
    except (FoldInterrupted, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"siim-jax cv: {error}") from error
    print(table.round(4).to_string())
    print(f"wrote {args.workdir / SUMMARY_CSV}, {args.workdir / SUMMARY_PNG} and fold_<k>/{OOF_FILE} "
          f"(tune on them: siim-jax tune --oof {args.workdir})")
    return 0
