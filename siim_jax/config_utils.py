"""Loading training configs with `ml_collections.config_flags`, and checking them against the schema.

`--config` takes a packaged recipe by name (`demo`, `unet_winner:1024`: `configs/NAME.py`, shipped as
`siim_jax.configs`) or a config file by path (`path/to/x.py[:arg]`); the text after the colon goes to its
`get_config(arg)`. Overrides are config_flags' own `--config.a.b=value`, parsed by the type of the field they set.
Every config then passes through `from_dict`, which copies it onto `configs.defaults.default_config()`: a key the
schema lacks or a value of the wrong type fails with a message naming the key. A config saved with a checkpoint
goes through it too.
"""

from __future__ import annotations

import importlib.resources
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from siim_jax.configs.defaults import default_config

CONFIG_FLAG = "config"


class ConfigError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------------- schema


def _tuples(value: Any) -> Any:
    """Lists (as JSON gives them) as tuples, nested ones too."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _is_section(node: ml_collections.ConfigDict, name: str) -> bool:
    """A nested section, as opposed to a field whose value may be a mapping (declared with type `object`)."""
    return isinstance(node[name], ml_collections.ConfigDict) and node.get_type(name) is not object


def _merge(node: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
    for name, value in values.items():
        key = prefix + name
        if name not in node:
            raise ConfigError(f"unknown config key '{key}'; known in this section: {sorted(node.keys())}")
        if _is_section(node, name):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{key}' is a section; got {value!r}")
            _merge(node[name], value, key + ".")
            continue
        try:
            node[name] = _tuples(value)
        except TypeError as error:
            raise ConfigError(f"config key '{key}': {value!r} does not fit the type of {node[name]!r}") from error


def from_dict(values: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`values` (a nested mapping, e.g. a saved config) checked against and completed from the schema."""
    if isinstance(values, ml_collections.ConfigDict):
        values = values.to_dict()
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config is a mapping of sections; got {values!r}")
    config = default_config()
    _merge(config, values, "")
    return config


def flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Every field of `config` as {'section.key': value}; a field of type `object` is one value, whatever it holds."""
    fields = {}
    for name in config.keys():
        if _is_section(config, name):
            fields.update(flat(config[name], f"{prefix}{name}."))
        else:
            fields[prefix + name] = config[name]
    return fields


# ------------------------------------------------------------------------------------------------ config files


def packaged_configs() -> list[str]:
    """Names of the recipes shipped as siim_jax.configs (configs/ in the repository)."""
    files = importlib.resources.files("siim_jax.configs").iterdir()
    return sorted(f.name[:-3] for f in files if f.name.endswith(".py") and f.name not in ("__init__.py", "defaults.py"))


def config_file(spec: str) -> str:
    """'NAME[:arg]' (a packaged recipe) or 'path/to/x.py[:arg]' as 'path/to/file.py[:arg]', for config_flags."""
    path, colon, arg = spec.partition(":")
    if not path.endswith(".py"):
        if path not in packaged_configs():
            raise ConfigError(f"no packaged config named {path!r}; known: {', '.join(packaged_configs())}")
        path = str(importlib.resources.files("siim_jax.configs") / f"{path}.py")
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} not found")
    return path + colon + arg


def _override_keys(argv: Sequence[str]) -> list[str]:
    return [arg.split("=", 1)[0].lstrip("-").removeprefix(CONFIG_FLAG + ".") for arg in argv
            if re.match(rf"--?{CONFIG_FLAG}\.", arg)]


def _unknown_key(config: ml_collections.ConfigDict, keys: Sequence[str]) -> ConfigError | None:
    """The error for the first of `keys` (dotted paths) that `config` lacks, if one does."""
    for key in keys:
        node = config
        for depth, part in enumerate(key.split(".")):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                prefix = ".".join(key.split(".")[:depth])
                return ConfigError(f"unknown config key '{key}'; known in '{prefix or CONFIG_FLAG}': {known}")
            node = node[part]
    return None


def _explain(error: Exception, spec: str | None, argv: Sequence[str]) -> ConfigError:
    """config_flags' and absl's errors as ConfigErrors naming the config file or the key at fault."""
    if isinstance(error, AttributeError) and error.name == "get_config":
        return ConfigError(f"config file {spec} defines no get_config(arg=None)")
    if isinstance(error, (AttributeError, KeyError)) and spec is not None:  # an override names a missing key
        return _unknown_key(load_config(spec), _override_keys(argv)) or ConfigError(str(error))
    bad_value = re.match(rf"flag --{CONFIG_FLAG}\.([\w.]+)=(.*?): (.*)", str(error), flags=re.DOTALL)
    if isinstance(error, flags.IllegalFlagValueError) and bad_value:
        key, value, reason = bad_value.groups()
        return ConfigError(f"config key '{key}': {value!r} does not fit its type ({reason})")
    if "Error whilst parsing config file" in str(error):  # config_flags appends the whole traceback
        return ConfigError(f"config {spec}: {str(error).strip().splitlines()[-1]}")
    return ConfigError(str(error))


def parse_config_flags(
    argv: Sequence[str], default: str | None = None
) -> tuple[ml_collections.ConfigDict | None, list[str]]:
    """(config, the other arguments) of a command line: `--config SPEC` (else `default`, if given) and its
    `--config.a.b=value` overrides are parsed by config_flags in flag values of their own, so each command
    parses its own."""
    argv = list(argv)
    spec = None
    for i, arg in enumerate(argv):  # the packaged recipes go to config_flags as file paths
        if arg == f"--{CONFIG_FLAG}" and i + 1 < len(argv):
            spec = argv[i + 1] = config_file(argv[i + 1])
        elif arg.startswith(f"--{CONFIG_FLAG}="):
            spec = config_file(arg.partition("=")[2])
            argv[i] = f"--{CONFIG_FLAG}={spec}"
    if spec is None and default is not None:
        spec = config_file(default)
    # config_flags executes every file into the same module, sys.modules['config_config']: without this, a
    # file lacking get_config would run the one left there by the file loaded before.
    sys.modules.pop(f"{CONFIG_FLAG}_config", None)
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        CONFIG_FLAG, spec, "a packaged recipe NAME[:ARG] or a config file PATH.py[:ARG]",
        flag_values=flag_values, sys_argv=["siim-jax", *argv],
    )
    try:
        rest = flag_values(["siim-jax", *argv], known_only=True)[1:]
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        raise _explain(error, spec, argv) from error
    return (None if spec is None else from_dict(holder.value)), rest


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of `--config spec` with `--config.a.b=value` overrides, checked against the schema."""
    config, rest = parse_config_flags([f"--{CONFIG_FLAG}", spec, *overrides])
    if rest:
        raise ConfigError(f"overrides look like --{CONFIG_FLAG}.section.key=value; got {rest}")
    return config
