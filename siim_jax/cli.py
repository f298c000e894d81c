"""The `siim-jax` command. Each subcommand lives in its own module, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help; the command's module is siim_jax.commands.<name>, providing add_arguments(parser) and
# run(args) -> int
COMMANDS = {
    "demo": "the main job on built-in synthetic data: train, tune, evaluate, predict",
    "synth": "write a synthetic dataset in the challenge's layout",
    "prepare": "decode the challenge tree once into a TFDS cache at the training size",
    "convert": "convert PyTorch weights (torchvision, timm, Cadene, smp) to a Flax checkpoint",
    "train": "train a UNet from a config file",
    "cv": "train every fold, then out-of-fold predictions and a summary of the folds",
    "tune": "grid-search the post-processing on a validation fold or out-of-fold predictions",
    "evaluate": "challenge metrics of a checkpoint on labelled images",
    "predict": "write a submission CSV from a checkpoint",
    "export": "export a checkpoint's model as ONNX or a StableHLO artifact, for deployment",
}


def _command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siim-jax", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def parse_command(argv: list[str]):
    """(module, parsed arguments) of a `siim-jax COMMAND ...` argument list (without the program name)."""
    name = _command_parser().parse_args(argv[:1]).command
    module = importlib.import_module(f"siim_jax.commands.{name}")
    parser = argparse.ArgumentParser(prog=f"siim-jax {name}", description=COMMANDS[name])
    module.add_arguments(parser)
    # A module may parse its own way: train, cv and demo take --config and its --config.a.b=value overrides,
    # parsed by ml_collections.config_flags (commands.arguments.parse_args_with_config).
    parse = getattr(module, "parse_args", lambda parser, args: parser.parse_args(args))
    return module, parse(parser, argv[1:])


def main(argv: list[str] | None = None) -> int:
    module, args = parse_command(sys.argv[1:] if argv is None else argv)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
