"""Flax NNX encoders and the UNet, built from `config.model`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from siim_jax.models.resnet import ENCODERS, ResNetEncoder
from siim_jax.models.unet import SegOutput, UNet

__all__ = ["ENCODERS", "ResNetEncoder", "SegOutput", "UNet", "build_model", "build_unfilled"]

# Speed variants (issue 22): each computes the same model another way and holds the same variables.
VARIANT_DEFAULTS = {"norm": "flax", "stem": "rgb", "maxpool": "reduce_window"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}  # float64: parity checks


def compute_dtype(name: str):
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def build_model(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """A randomly initialised UNet (or bare encoder); each call says `train=True` or `train=False`."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    dtype = compute_dtype(model_config.dtype)
    # Model dirs written before these keys existed build with the defaults.
    variants = {key: model_config.get(key, default) for key, default in VARIANT_DEFAULTS.items()}
    if model_config.get("encoder_only", False):
        return ResNetEncoder(model_config.encoder, dtype=dtype, remat=model_config.remat, rngs=rngs, **variants)
    return UNet(
        model_config.encoder,
        classes=model_config.classes,
        decoder_channels=tuple(model_config.decoder_channels),
        attention=model_config.attention,
        cls_head=model_config.cls_head,
        cls_dropout=model_config.cls_dropout,
        dtype=dtype,
        remat=model_config.remat,
        rngs=rngs,
        **variants,
    )


def build_unfilled(model_config: ml_collections.ConfigDict) -> nnx.Module:
    """`build_model` without paying for random initialisation (slow to compile on CPU): Params and BatchStats are
    left as `jax.ShapeDtypeStruct`s for a converter or a checkpoint restore to fill with `nnx.update`."""
    model = nnx.eval_shape(lambda: build_model(model_config))
    others = nnx.Not(nnx.Any(nnx.Param, nnx.BatchStat))
    # Only the small remainder (dropout RNG state) is materialised; XLA drops the unused initialisers.
    nnx.update(model, jax.jit(lambda: nnx.state(build_model(model_config), others))())
    return model
