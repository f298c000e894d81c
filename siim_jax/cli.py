"""The `siim-jax` command. Each subcommand lives in its own module, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module providing add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "synth": ("siim_jax.data.synthetic", "write a synthetic dataset in the challenge's layout"),
    "prepare": ("siim_jax.data.tfds_siim", "decode the challenge tree once into a TFDS cache at the training size"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siim-jax", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    known = _parser().parse_args(argv[:1])
    module = importlib.import_module(COMMANDS[known.command][0])
    parser = argparse.ArgumentParser(prog=f"siim-jax {known.command}", description=COMMANDS[known.command][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
