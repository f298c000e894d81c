"""`siim-jax train --config NAME[:arg] --workdir DIR [--config.a.b=value ...]`: `training.loop.train_and_evaluate`.

`--config` is a packaged recipe (configs/NAME.py, shipped as `siim_jax.configs`) or a config file PATH.py[:arg]; see
siim_jax.config_utils. Exit status 1 names the step or file at fault; 130 after Ctrl-C (the step is saved first).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from siim_jax import sharding
from siim_jax.commands.arguments import add_config_argument, parse_args_with_config
from siim_jax.data.dicom import DicomError
from siim_jax.data.labels import LabelError
from siim_jax.training.loop import NonFiniteLossError, train_and_evaluate

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--workdir", required=True, type=Path, help="checkpoints, metrics and curves go here")
    parser.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, default=True,
        help="continue from the workdir's latest checkpoint when it has one (default)",
    )
    parser.add_argument("--coordinator-address", help="multi-process runs: host:port of process 0")
    parser.add_argument("--num-processes", type=int, help="multi-process runs: how many processes")
    parser.add_argument("--process-id", type=int, help="multi-process runs: this process's index")


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    return parse_args_with_config(parser, argv)


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sharding.initialise_distributed(args.coordinator_address, args.num_processes, args.process_id)
    try:
        result = train_and_evaluate(args.config, args.workdir, resume=args.resume)
    except (NonFiniteLossError, OSError, LabelError, DicomError) as error:  # each names the step or file at fault
        print(f"siim-jax train: {error}", file=sys.stderr)
        return 1
    log.info("finished: %s", result)
    return 130 if result["stopped_by"] == "SIGINT" else 0
