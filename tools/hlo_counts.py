"""Kernel counts in the optimised HLO of one train step, per speed variant (issue 22), on whatever backend runs it.

    python tools/hlo_counts.py [--encoder resnet18] [--size 64] [--batch 2] [--dtype float32] [VARIANT ...]

Each variant is the project's train step (`make_train_step`: UNet forward, BCE + soft-Dice loss, backward, Adam with
global-norm clipping) built from the default config with the variant's overrides, lowered on one batch and
compiled. The table counts, in the optimised module:
  kernels    instructions outside fusion bodies that do work (fusions, convolutions, reduces, custom calls, ...;
             not parameters, constants, tuples, bitcasts): on a GPU, roughly one launch each
  fusions    of those, the fusions
  reductions of those, the kernels that reduce (a reduce of their own or inside their fusion body)
  reduce_ops reduce instructions anywhere, fusion bodies included
  scatters   select-and-scatter and scatter kernels (the max pool's backward)
XLA:CPU fuses less aggressively than XLA:GPU, so the counts compare variants with each other, not with a GPU's
kernel table.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

VARIANTS: dict[str, dict[str, object]] = {
    "baseline": {},
    "bn_fused": {"model.norm": "fused"},
    "one_norm": {"optim.flatten": True},
    "stem_pad4": {"model.stem": "pad4"},
    "stem_grey": {"model.stem": "grey"},
    "maxpool_slices": {"model.maxpool": "slices"},
}
COLUMNS = ("kernels", "fusions", "reductions", "reduce_ops", "scatters")
# Instructions that launch nothing: views, tuples and the computation's own inputs.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")


def split_computations(hlo_text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an HLO module's text; the entry computation is '__entry__'."""
    computations, name = {}, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            name = "__entry__" if line.startswith("ENTRY") else header.group(1)
            computations[name] = []
        elif name is not None and line.strip() not in ("", "}"):
            computations[name].append(line)
    return computations


def opcode(line: str) -> str | None:
    match = _INSTRUCTION.match(line)
    return match.group(1) if match else None


def hlo_counts(hlo_text: str) -> dict[str, int]:
    """The table's columns (see the module docstring) for one optimised HLO module."""
    computations = split_computations(hlo_text)
    bodies = {called for lines in computations.values() for line in lines for called in _CALLED.findall(line)}
    # Control flow (while bodies, conditionals) runs kernels too; fusion bodies and reduce combiners do not.
    top_level = [name for name in computations if name not in bodies]
    reduces_inside = {name: sum(opcode(line) == "reduce" for line in lines) for name, lines in computations.items()}
    counts = Counter()
    for name in top_level:
        for line in computations[name]:
            op = opcode(line)
            if op is None or op in _FREE:
                continue
            counts["kernels"] += 1
            called = _CALLED.findall(line)
            if op == "fusion":
                counts["fusions"] += 1
            if op == "reduce" or (op == "fusion" and any(reduces_inside.get(c, 0) for c in called)):
                counts["reductions"] += 1
            if op in ("select-and-scatter", "scatter") or "scatter" in line.split("=", 1)[0]:
                counts["scatters"] += 1
    counts["reduce_ops"] = sum(reduces_inside.values())
    return {column: counts[column] for column in COLUMNS}


def train_step_hlo(overrides: dict[str, object], *, encoder: str, size: int, batch: int, dtype: str) -> str:
    """The optimised HLO text of the train step of a UNet-`encoder` with `overrides` ('section.key': value)."""
    import jax
    import numpy as np
    from flax import nnx
    from siim_jax.configs.defaults import default_config

    from siim_jax import sharding as sharding_lib
    from siim_jax.models import build_model
    from siim_jax.training import optim
    from siim_jax.training.losses import make_loss
    from siim_jax.training.state import build_train_state, make_train_step

    config = default_config()
    config.model.update({"encoder": encoder, "dtype": dtype, "decoder_channels": (32, 32, 16, 16, 16)})
    config.optim.clip_norm = 1.0  # clipping on: it is where a second global norm could hide
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    mesh = sharding_lib.data_mesh()
    optimizer = optim.build_optimizer(config.optim)
    model_def, state = build_train_state(build_model(config.model, nnx.Rngs(0)), optimizer, seed=0, ema=False)
    step = make_train_step(
        model_def, make_loss(config.loss), optimizer, optim.make_schedule(config.optim, 10), mesh,
        flatten=config.optim.flatten,
    )  # fmt: skip
    batch_arrays = {
        "image": np.zeros((batch, size, size), np.uint8),
        "mask": np.zeros((batch, size, size), np.uint8),
        "positive": np.zeros((batch,), np.float32),
    }
    batch_arrays = jax.device_put(batch_arrays, sharding_lib.batch_sharding(mesh))
    return step.lower(sharding_lib.replicate(state, mesh), batch_arrays).compile().as_text()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    print(f"{'variant':<16}" + "".join(f"{column:>12}" for column in COLUMNS))
    for name in args.variants:
        text = train_step_hlo(VARIANTS[name], encoder=args.encoder, size=args.size, batch=args.batch, dtype=args.dtype)
        counts = hlo_counts(text)
        print(f"{name:<16}" + "".join(f"{counts[column]:>12}" for column in COLUMNS), flush=True)


if __name__ == "__main__":
    main()
