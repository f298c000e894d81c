"""`siim-jax convert SRC DST --source S --arch A`: PyTorch weights to a model directory (siim_jax.models.convert)."""

from __future__ import annotations

import argparse
from pathlib import Path

from siim_jax.models import ENCODERS
from siim_jax.models.convert import SOURCES, convert_with_config
from siim_jax.models.io import save_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="PyTorch checkpoint: .pth / .pt (read with weights_only=True) or .safetensors")
    parser.add_argument("dst", help="output directory (a model checkpoint for config.model.init_from)")
    parser.add_argument("--source", choices=SOURCES, required=True, help="who published the checkpoint")
    parser.add_argument(
        "--arch", required=True, help=f"an encoder ({', '.join(sorted(ENCODERS))}) or unet_<encoder> for smp Unets"
    )


def run(args: argparse.Namespace) -> int:
    model, model_config = convert_with_config(args.src, args.source, args.arch)
    save_model(args.dst, model, model_config)
    print(f"wrote {Path(args.dst).absolute()} ({model_config.encoder}{'' if model_config.encoder_only else ' UNet'})")
    return 0
