"""The training config: its schema with defaults, loading config files, and `--config.a.b=v` overrides.

Every config passes through `from_dict`, which copies it onto `default_config()`: a key the schema lacks or a
value of the wrong type fails with a message naming the key. Config files (`configs/*.py`) define
`get_config(arg=None)`; `load_config('configs/x.py:arg')` passes `arg`.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from siim_jax.data.pipeline import default_data_config
from siim_jax.losses import LOSS_DEFAULTS
from siim_jax.models import default_model_config
from siim_jax.optim import default_optim_config

# Fields whose value may take more than one shape; they are replaced whole, without the type check.
FREE_FORM = {
    "loss.weights": "a mapping of loss component names to weights",
    "data.balance.positive_fraction": "a number or ((start_epoch, fraction), ...)",
}


class ConfigError(ValueError):
    pass


def default_train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "epochs": 100,
            "max_steps": 0,  # stop after this many steps in all (0 = run every epoch)
            "batch_size": 4,  # global: images per optimizer step, over all devices and processes
            "grad_accum": 1,  # micro-batches per step (each batch_size / grad_accum images)
            "eval_batch_size": 0,  # global; 0 = batch_size
            "eval_every_epochs": 1,
            "eval_at_start": False,  # also evaluate the initial weights (logged at step 0)
            "threshold": 0.5,  # pixel probability threshold of the validation Dice
            "log_every_steps": 50,  # the only host syncs between evaluations
            "checkpoint_every_steps": 0,  # 0 = at the end of each epoch only
            "keep_best": 3,  # checkpoints kept by class-gated validation Dice (dice_gated), besides the latest
            "seed": 0,  # model init and dropout
        }
    )


def default_config() -> ml_collections.ConfigDict:
    """The schema, locked: assigning a key it lacks raises."""
    config = ml_collections.ConfigDict(
        {
            "model": default_model_config(),
            "data": default_data_config(),
            "loss": dict(LOSS_DEFAULTS),
            "optim": default_optim_config(),
            "train": default_train_config(),
        }
    )
    return _locked(config)


def _locked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.lock()
    for key in FREE_FORM:
        parent, name = _parent(config, key)
        if isinstance(parent[name], ml_collections.ConfigDict):
            parent[name].unlock()
    return config


def _parent(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    *path, name = key.split(".")
    node = config
    for part in path:
        node = node[part]
    return node, name


def _tuples(value: Any) -> Any:
    """Lists (as JSON gives them) as tuples, nested ones too."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _assign(node: ml_collections.ConfigDict, name: str, value: Any, key: str) -> None:
    value = _tuples(value)
    if key in FREE_FORM:
        with node.ignore_type():
            node[name] = value
        return
    if isinstance(node[name], ml_collections.ConfigDict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' is a section; got {value!r}")
        _merge(node[name], value, key + ".")
        return
    try:
        node[name] = value
    except TypeError as error:
        raise ConfigError(f"config key '{key}': {value!r} does not fit the type of {node[name]!r}") from error


def _merge(node: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
    for name, value in values.items():
        if name not in node:
            raise ConfigError(f"unknown config key '{prefix}{name}'; known in this section: {sorted(node.keys())}")
        _assign(node, name, value, prefix + name)


def from_dict(values: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`values` (a nested mapping, e.g. a saved config) checked against and completed from the schema."""
    if isinstance(values, ml_collections.ConfigDict):
        values = values.to_dict()
    config = default_config()
    _merge(config, values, "")
    return config


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config(arg)` of the file in 'path/to/config.py[:arg]' and checks the result."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"siim_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(arg=None)")
    return from_dict(module.get_config(arg or None))


def _parse_value(raw: str, current: Any) -> Any:
    if isinstance(current, str):
        return raw
    if isinstance(current, bool) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word, e.g. --config.model.attention=scse


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies '--config.a.b=value' strings (the leading dashes are optional) to `config` in place.

    Values are parsed as Python literals, except for string fields, which take the text as it is.
    """
    for override in overrides:
        text = override.lstrip("-")
        key, equals, raw = text.partition("=")
        if not key.startswith("config.") or not equals:
            raise ConfigError(f"overrides look like --config.section.key=value, got {override!r}")
        key = key.removeprefix("config.")
        try:
            node, name = _parent(config, key)
        except (KeyError, AttributeError) as error:
            raise ConfigError(f"unknown config key '{key}'") from error
        if name not in node:
            raise ConfigError(f"unknown config key '{key}'; known in this section: {sorted(node.keys())}")
        _assign(node, name, _parse_value(raw, node[name]), key)
    return config
