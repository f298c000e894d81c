"""Model checkpoints: an orbax directory of {'params', 'batch_stats'} plus the model config as JSON.

These are what `siim-jax convert` writes, what training starts from (`config.model.init_from`) and what
prediction loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from siim_jax.models import ResNetEncoder, UNet, build_unfilled
from siim_jax.sharding import restore_target

CONFIG_FILE = "model_config.json"
STATE_DIR = "state"
_COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def _pure_state(model: nnx.Module) -> dict:
    return {name: nnx.to_pure_dict(nnx.state(model, kind)) for name, kind in _COLLECTIONS.items()}


def _assign(model: nnx.Module, pure_state: dict) -> None:
    for name, kind in _COLLECTIONS.items():
        state = nnx.state(model, kind)
        nnx.replace_by_pure_dict(state, pure_state[name])
        nnx.update(model, state)


def _shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    return {"/".join(map(str, path)): variable.shape for path, variable in flat}


def save_model(path: str | Path, model: nnx.Module, model_config: ml_collections.ConfigDict) -> None:
    """Write `model`'s parameters and batch statistics and the config that rebuilds it to the new directory `path`."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=False)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / STATE_DIR, _pure_state(model))
        checkpointer.wait_until_finished()
    (path / CONFIG_FILE).write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")


def read_model_config(path: str | Path) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads((Path(path).absolute() / CONFIG_FILE).read_text()))


def load_model(path: str | Path) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """The model saved at `path` and its config, its arrays replicated over every device of this run."""
    path = Path(path).absolute()
    model_config = read_model_config(path)
    model = build_unfilled(model_config)
    with ocp.StandardCheckpointer() as checkpointer:
        _assign(model, checkpointer.restore(path / STATE_DIR, restore_target(_pure_state(model))))
    return model, model_config


def _encoder_of(module: nnx.Module) -> ResNetEncoder:
    return module.encoder if isinstance(module, UNet) else module


def copy_weights(loaded: nnx.Module, model: nnx.Module, path: str | Path) -> None:
    """Overwrite `model`'s parameters and batch statistics with `loaded`'s, read from `path` (training's `init_from`).

    An encoder-only `loaded` (converted ImageNet weights) fills a UNet's encoder and leaves its decoder and heads
    as initialised. Encoders must be the same network; every array must match in shape.
    """
    target = _encoder_of(model) if isinstance(loaded, ResNetEncoder) else model
    theirs, ours = _encoder_of(loaded).encoder_name, _encoder_of(target).encoder_name
    if theirs != ours:
        raise ValueError(f"{path} holds a {theirs} encoder, the model has {ours}")
    have, want = _shapes(loaded), _shapes(target)
    differences = [
        f"{name}: checkpoint {have.get(name, 'absent')}, model {want.get(name, 'absent')}"
        for name in sorted(have.keys() | want.keys())
        if have.get(name) != want.get(name)
    ]
    if differences:
        raise ValueError(f"{path} does not fit the model's {type(target).__name__}:\n  " + "\n  ".join(differences))
    _assign(target, _pure_state(loaded))
