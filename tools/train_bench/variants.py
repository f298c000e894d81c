"""The train-step variants that `--variants` measures side by side (issue 22): name -> config overrides.

Each override is a dotted key of the project's config (`siim_jax.configs.defaults.default_config()`: model, optim,
train, ...) and its value, applied before the step is built. The table is in order of expected gain on the H200
profile of 2026-12-04 (49.3 ms of kernels per UNet-ResNet50 step at 512²x32), so that a run short of time drops
the least promising ones, which come last:
  combined        all of the single variants below that change no result beyond round-off;
  bn_fused        one-pass float32 BatchNorm statistics, norm + ReLU (+ residual add) + cast in one kernel: the
                  61 convert (3.3 ms) and 53 ReLU (2.45 ms) passes and part of the BatchNorm backward (4.8 ms);
  one_norm        one global norm for clipping and logging, the update on one flat vector: most of the 743 tiny
                  reductions (6.7 ms);
  stem_grey       the grey input folded into a 1-channel first convolution: the stem's padding and layout
                  kernels (1.7 ms) and a third of its work;
  stem_pad4       the 3-channel stem padded to 4 on purpose (the same kernels, less of the gain);
  batch64         twice the batch: fewer, fuller kernels per image;
  maxpool_slices  the stem max-pool as a maximum of shifted slices, whose backward is a select instead of one
                  select_and_scatter (0.66 ms);
  remat           recomputation in the backward pass: saves memory and costs time; measured to say how much.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BASELINE = "baseline"
SINGLE: dict[str, dict[str, Any]] = {
    "bn_fused": {"model.norm": "fused"},
    "one_norm": {"optim.flatten": True},
    "stem_grey": {"model.stem": "grey"},
    "stem_pad4": {"model.stem": "pad4"},
    "batch64": {"train.batch_size": 64},
    "maxpool_slices": {"model.maxpool": "slices"},
    "remat": {"model.remat": True},
}
COMBINED = ("bn_fused", "one_norm", "stem_grey", "maxpool_slices")
VARIANTS: dict[str, dict[str, Any]] = {
    BASELINE: {},
    "combined": {key: value for name in COMBINED for key, value in SINGLE[name].items()},
    **SINGLE,
}


def resolve(spec: str) -> list[str]:
    """The variants named in `spec` ('all', or names joined by commas) in the table's order, baseline first:
    every ratio and every spread is read against it."""
    names = list(VARIANTS) if spec == "all" else [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)} or 'all'")
    return [name for name in VARIANTS if name == BASELINE or name in names]


def apply(config, overrides: Mapping[str, Any]):
    """`config` (a ConfigDict) with `overrides` set, in a copy; a key the schema lacks raises."""
    config = config.copy_and_resolve_references()
    config.update_from_flattened_dict(dict(overrides))
    return config
