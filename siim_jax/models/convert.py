"""PyTorch checkpoints (torchvision, timm, Cadene, smp; `.pth`/`.pt` or `.safetensors`) → Flax models.

A table of rules maps each PyTorch module path to a Flax module path; a rule's layer kind fixes how that
module's tensors are renamed and transformed. Everything that fails to map is reported in one error.

    siim-jax convert SRC DST --source {torchvision,timm,cadene,smp} --arch ARCH

writes DST as a model checkpoint (`siim_jax.models.io`) that training starts from (`config.model.init_from`) and
prediction loads. ARCH is an encoder (`resnet50`, `se_resnext50_32x4d`, ...) for ImageNet weights, or
`unet_<encoder>` for a whole smp Unet trained in PyTorch.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from siim_jax.configs.defaults import default_model_config
from siim_jax.models import ENCODERS, build_unfilled

SOURCES = ("torchvision", "timm", "cadene", "smp")
UNET_PREFIX = "unet_"


class ConversionError(ValueError):
    """A state dict that does not fit the target model; the message lists every offending key."""


def _same(array: np.ndarray) -> np.ndarray:
    return array


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    # OIHW → HWIO; a tensor of another rank is left for the shape check to report.
    return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight


# PyTorch leaf → (Flax leaf, transform), for each layer kind.
LEAVES: dict[str, dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]] = {
    "conv": {"weight": ("kernel", _conv_kernel), "bias": ("bias", _same)},
    "bn": {
        "weight": ("scale", _same),
        "bias": ("bias", _same),
        "running_mean": ("mean", _same),
        "running_var": ("var", _same),  # both keep PyTorch's unbiased running variance
    },
    "linear": {"weight": ("kernel", np.transpose), "bias": ("bias", _same)},
}
DROPPED_LEAVES = {"num_batches_tracked"}


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    """`layer{stage}.{block}` → a regex whose named groups capture the numbers."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts)))


@dataclasses.dataclass(frozen=True)
class Rule:
    """PyTorch module path template → Flax module path template ('/'-separated; None drops the module)."""

    source: str
    target: str | None
    kind: str = "conv"

    def target_of(self, module: str) -> str | None:
        """The Flax module path for a source module this rule matches (None if it does not)."""
        match = _template_regex(self.source).fullmatch(module)
        return self.target.format(**match.groupdict()) if match and self.target is not None else None

    def matches(self, module: str) -> bool:
        return _template_regex(self.source).fullmatch(module) is not None

    def source_of(self, module: str) -> str | None:
        """The source module path for a Flax module this rule produces (None if it does not)."""
        match = self.target is not None and _template_regex(self.target).fullmatch(module)
        return self.source.format(**match.groupdict()) if match else None

    def prefixed(self, source_prefix: str, target_prefix: str) -> Rule:
        target = None if self.target is None else target_prefix + self.target
        return Rule(source_prefix + self.source, target, self.kind)


_STAGES = (
    Rule("layer{stage}.{block}.conv{n}", "layer{stage}/{block}/conv{n}"),
    Rule("layer{stage}.{block}.bn{n}", "layer{stage}/{block}/bn{n}", "bn"),
    Rule("layer{stage}.{block}.downsample.0", "layer{stage}/{block}/downsample/conv"),
    Rule("layer{stage}.{block}.downsample.1", "layer{stage}/{block}/downsample/bn", "bn"),
)
# torchvision's ResNets; timm's and smp's ResNets share the layout.
TORCHVISION_RULES = (Rule("conv1", "conv1"), Rule("bn1", "bn1", "bn"), *_STAGES, Rule("fc", None))
TIMM_SE_RULES = (*TORCHVISION_RULES, Rule("layer{stage}.{block}.se.fc{n}", "layer{stage}/{block}/se/fc{n}"))
# Cadene's pretrainedmodels SENets, also smp's se_resnext encoders.
CADENE_RULES = (
    Rule("layer0.conv1", "conv1"),
    Rule("layer0.bn1", "bn1", "bn"),
    *_STAGES,
    Rule("layer{stage}.{block}.se_module.fc{n}", "layer{stage}/{block}/se/fc{n}"),
    Rule("last_linear", None),
)

# (source, encoder family) → rules
ENCODER_LAYOUTS = {
    ("torchvision", "resnet"): TORCHVISION_RULES,
    ("timm", "resnet"): TORCHVISION_RULES,
    ("smp", "resnet"): TORCHVISION_RULES,
    ("timm", "se_resnext"): TIMM_SE_RULES,
    ("cadene", "se_resnext"): CADENE_RULES,
    ("smp", "se_resnext"): CADENE_RULES,
}


def unet_rules(encoder_rules: tuple[Rule, ...], n_blocks: int) -> tuple[Rule, ...]:
    """smp Unet: `encoder.*` with the encoder's rules, then the decoder and heads."""
    last = f"decoder.blocks.{n_blocks - 1}.attention1.attention."
    return (
        *(rule.prefixed("encoder.", "encoder/") for rule in encoder_rules),
        # smp builds attention1 for the skip-less last block without ever calling it.
        Rule(last + "cSE.{i}", None),
        Rule(last + "sSE.{i}", None),
        Rule("decoder.blocks.{b}.conv{n}.0", "decoder/{b}/conv{n}/conv"),
        Rule("decoder.blocks.{b}.conv{n}.1", "decoder/{b}/conv{n}/bn", "bn"),
        Rule("decoder.blocks.{b}.attention{n}.attention.cSE.1", "decoder/{b}/attention{n}/channel_gate/fc1"),
        Rule("decoder.blocks.{b}.attention{n}.attention.cSE.3", "decoder/{b}/attention{n}/channel_gate/fc2"),
        Rule("decoder.blocks.{b}.attention{n}.attention.sSE.0", "decoder/{b}/attention{n}/spatial_gate"),
        Rule("segmentation_head.0", "segmentation_head"),
        Rule("classification_head.3", "classification_head/fc", "linear"),
    )


FlaxPath = tuple[str | int, ...]


def _flax_path(text: str) -> FlaxPath:
    return tuple(int(part) if part.isdigit() else part for part in text.split("/"))


def translate(
    state_dict: Mapping[str, np.ndarray], rules: tuple[Rule, ...]
) -> tuple[dict[FlaxPath, tuple[str, np.ndarray]], list[str]]:
    """Flax path → (source key, transformed array) for every tensor the rules map, and the keys none maps."""
    mapped, unmatched = {}, []
    for key, array in state_dict.items():
        module, _, leaf = key.rpartition(".")
        rule = next((rule for rule in rules if rule.matches(module)), None)
        if leaf in DROPPED_LEAVES or (rule is not None and rule.target is None):
            continue
        if rule is None or leaf not in LEAVES[rule.kind]:
            unmatched.append(key)
            continue
        name, transform = LEAVES[rule.kind][leaf]
        mapped[_flax_path(f"{rule.target_of(module)}/{name}")] = (key, transform(array))
    return mapped, unmatched


def _source_key(path: FlaxPath, rules: tuple[Rule, ...]) -> str:
    """The PyTorch key a Flax path expects (for error messages)."""
    module, leaf = "/".join(map(str, path[:-1])), path[-1]
    for rule in rules:
        source = rule.source_of(module)
        if source is not None:
            for torch_leaf, (flax_leaf, _) in LEAVES[rule.kind].items():
                if flax_leaf == leaf:
                    return f"{source}.{torch_leaf}"
    return "/".join(map(str, path))


def load_into_model(model: nnx.Module, state_dict: Mapping[str, np.ndarray], rules: tuple[Rule, ...]) -> None:
    """Fill every Param and BatchStat of `model` from `state_dict`, or raise one error listing all problems."""
    mapped, unexpected = translate(state_dict, rules)
    expected = dict(nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))))
    missing = [_source_key(path, rules) for path in expected if path not in mapped]
    unexpected += [key for path, (key, _) in mapped.items() if path not in expected]
    misshaped = [
        f"{key}: {array.shape} (as {'/'.join(map(str, path))}), model expects {expected[path].shape}"
        for path, (key, array) in mapped.items()
        if path in expected and array.shape != expected[path].shape
    ]
    problems = {"missing keys": missing, "unexpected keys": unexpected, "mis-shaped tensors": misshaped}
    if any(problems.values()):
        details = "\n".join(
            f"{title} ({len(items)}):\n  " + "\n  ".join(items) for title, items in problems.items() if items
        )
        raise ConversionError(f"state dict does not fit {type(model).__name__}:\n{details}")
    nnx.update(model, nnx.from_flat_state({path: jnp.asarray(mapped[path][1], jnp.float32) for path in expected}))


def load_state_dict(src: str | Path | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """NumPy arrays by key from a path (`.safetensors`, or a torch pickle read with weights_only) or a mapping.

    Training checkpoints that wrap the weights (`{'state_dict': ...}`, `{'model': ...}`) or prefix every key
    (`module.` from DataParallel, `_orig_mod.` from torch.compile, `model.`) are unwrapped.
    """
    if isinstance(src, Mapping):
        state = src
    elif str(src).endswith(".safetensors"):
        from safetensors.numpy import load_file

        state = load_file(str(src))
    else:
        import torch  # only here: nothing else in siim_jax needs torch

        state = torch.load(str(src), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    for prefix in ("module.", "_orig_mod.", "model."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return {key: _to_numpy(value) for key, value in state.items()}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch is already loaded by whoever made it
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def _encoder_name(source: str, name: str) -> tuple[str, str]:
    """(encoder family, our encoder name) for an arch's encoder as published by `source`."""
    if name.startswith("resnet"):
        return "resnet", name
    depth = name.removeprefix("se_resnext").removeprefix("seresnext")
    # timm's SE-ResNeXt pools its stem like torchvision; Cadene's (and smp's) uses Caffe's ceil mode.
    return "se_resnext", ("seresnext" if source == "timm" else "se_resnext") + depth


def _decoder_widths(state_dict: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    """Each decoder block's width from its last conv; smp's default where that tensor is missing (then reported)."""
    defaults = default_model_config().decoder_channels
    blocks = {int(m.group(1)) for m in map(re.compile(r"decoder\.blocks\.(\d+)\.").match, state_dict) if m}
    if blocks != set(range(len(defaults))):
        raise ConversionError(f"expected smp's {len(defaults)} decoder blocks, found {sorted(blocks)}")
    weights = [state_dict.get(f"decoder.blocks.{i}.conv2.0.weight") for i in range(len(defaults))]
    return tuple(default if w is None else w.shape[0] for w, default in zip(weights, defaults))


def _unet_options(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """UNet config fields read from an smp Unet state dict's keys and shapes."""
    if "segmentation_head.0.weight" not in state_dict:
        raise ConversionError("not a whole smp Unet state dict: no segmentation_head.0.weight")
    classes = state_dict["segmentation_head.0.weight"].shape[0]
    cls_weight = state_dict.get("classification_head.3.weight")
    if cls_weight is not None and cls_weight.shape[0] != classes:
        raise ConversionError(f"classification head has {cls_weight.shape[0]} classes, masks have {classes}")
    return {
        "classes": classes,
        "decoder_channels": _decoder_widths(state_dict),
        "attention": "scse" if any(".attention1.attention." in key for key in state_dict) else None,
        "cls_head": cls_weight is not None,
    }


def conversion_plan(
    state_dict: Mapping[str, np.ndarray], source: str, arch: str
) -> tuple[ml_collections.ConfigDict, tuple[Rule, ...], Mapping[str, np.ndarray]]:
    """The model config to build, the rules to fill it with, and the part of `state_dict` they apply to."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    is_unet = arch.startswith(UNET_PREFIX)
    family, encoder = _encoder_name(source, arch.removeprefix(UNET_PREFIX))
    if encoder not in ENCODERS or (source, family) not in ENCODER_LAYOUTS:
        raise ValueError(f"no {arch!r} weights in {source}'s layout; encoders: {sorted(ENCODERS)}")
    if is_unet and source != "smp":
        raise ValueError(f"whole-UNet checkpoints come from smp; convert {source} weights with --arch {encoder}")
    rules = ENCODER_LAYOUTS[source, family]
    model_config = default_model_config()
    model_config.encoder = encoder
    if is_unet:
        options = _unet_options(state_dict)
        model_config.update(options)
        rules = unet_rules(rules, len(options["decoder_channels"]))
    else:
        model_config.encoder_only = True
        if any(key.startswith("encoder.") for key in state_dict):  # the encoder of a whole smp model
            state_dict = {key[len("encoder.") :]: v for key, v in state_dict.items() if key.startswith("encoder.")}
    return model_config, rules, state_dict


def convert_with_config(
    src: str | Path | Mapping[str, Any], source: str = "smp", arch: str = "unet_resnet50"
) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """`convert`, also returning the model config that rebuilds the model."""
    model_config, rules, state_dict = conversion_plan(load_state_dict(src), source, arch)
    model = build_unfilled(model_config)
    load_into_model(model, state_dict, rules)
    return model, model_config


def convert(src: str | Path | Mapping[str, Any], source: str = "smp", arch: str = "unet_resnet50") -> nnx.Module:
    """A Flax model holding the weights of `src` (a path or an in-memory state dict), the kind training builds.

    For `unet_*` archs, `model(x, train=False)` (x float32 NHWC) returns `SegOutput(mask_logits (N, H, W,
    classes), class_logits)`, class_logits None unless the checkpoint has smp's classification head; SCSE,
    classes and decoder widths are read from the state dict. Encoder archs return the five feature maps
    (strides 2 to 32).
    """
    return convert_with_config(src, source, arch)[0]
