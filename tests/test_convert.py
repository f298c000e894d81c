"""Weight conversion (state dict → Flax) and model checkpoints (save, load, init_from)."""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from siim_jax.configs.defaults import default_model_config

from siim_jax.commands import convert as convert_command
from siim_jax.models import build_model, build_unfilled
from siim_jax.models.convert import ConversionError, convert, convert_with_config
from siim_jax.models.io import load_model, save_model
from siim_jax.training.checkpoints import load_initial_weights

from .conftest import reference_import

torch = reference_import("torch")
smp = reference_import("segmentation_models_pytorch")

X = np.random.default_rng(0).standard_normal((1, 64, 96, 3)).astype(np.float32)


def _smp_unet(**kwargs) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, **kwargs)
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def unet_state() -> dict[str, np.ndarray]:
    return _smp_unet(classes=1, aux_params={"classes": 1, "dropout": 0.0})


def test_missing_renamed_and_misshaped_keys_fail_together(unet_state):
    state = dict(unet_state)
    del state["decoder.blocks.0.conv1.0.weight"]
    state["encoder.layer1.0.convX.weight"] = state.pop("encoder.layer1.0.conv1.weight")
    state["segmentation_head.0.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ConversionError) as error:
        convert(state, source="smp", arch="unet_resnet18")
    message = str(error.value)
    for name in (
        "decoder.blocks.0.conv1.0.weight",  # missing
        "encoder.layer1.0.conv1.weight",  # missing, renamed away
        "encoder.layer1.0.convX.weight",  # unexpected
        "segmentation_head.0.bias",  # mis-shaped
    ):
        assert name in message


def test_options_are_read_from_the_state_dict():
    state = _smp_unet(classes=3, decoder_attention_type="scse", decoder_channels=(64, 32, 32, 16, 16))
    model, config = convert_with_config(state, source="smp", arch="unet_resnet18")
    assert (config.attention, config.cls_head, config.classes) == ("scse", False, 3)
    assert tuple(config.decoder_channels) == (64, 32, 32, 16, 16)
    output = model(jnp.asarray(X), train=False)
    assert output.mask_logits.shape == (1, 64, 96, 3) and output.class_logits is None


def test_classification_head_gives_mask_and_class_logits(unet_state):
    masks, labels = convert(unet_state, source="smp", arch="unet_resnet18")(jnp.asarray(X), train=False)
    assert masks.shape == (1, 64, 96, 1) and labels.shape == (1, 1)


def test_imagenet_classifiers_are_dropped():
    torchvision = reference_import("torchvision")
    state = torchvision.models.resnet18().state_dict()  # with fc
    features = convert(state, source="torchvision", arch="resnet18")(jnp.asarray(X), train=False)
    assert [f.shape[-1] for f in features] == [64, 64, 128, 256, 512]
    cadene = smp.encoders.get_encoder("se_resnext50_32x4d", weights=None).state_dict()
    cadene |= {"last_linear.weight": torch.zeros(1000, 2048), "last_linear.bias": torch.zeros(1000)}
    assert convert(cadene, source="cadene", arch="se_resnext50_32x4d").encoder_name == "se_resnext50_32x4d"


def test_timm_se_resnext_gets_timms_stem_pool():
    timm = reference_import("timm")
    state = timm.create_model("seresnext50_32x4d", pretrained=False).state_dict()
    assert convert(state, source="timm", arch="se_resnext50_32x4d").encoder_name == "seresnext50_32x4d"


def test_smp_unet_encoder_alone(unet_state):
    encoder = convert(unet_state, source="smp", arch="resnet18")
    whole = convert(unet_state, source="smp", arch="unet_resnet18")
    for ours, reference in zip(jax.tree.leaves(nnx.state(encoder)), jax.tree.leaves(nnx.state(whole.encoder))):
        np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize(
    "source, arch", [("torchvision", "se_resnext50_32x4d"), ("cadene", "resnet50"), ("timm", "unet_resnet50")]
)
def test_impossible_source_and_arch_pairs_are_refused(unet_state, source, arch):
    with pytest.raises(ValueError):
        convert(unet_state, source=source, arch=arch)


def test_files_pth_wrapped_and_safetensors(unet_state, tmp_path):
    safetensors_numpy = reference_import("safetensors.numpy")
    reference = convert(unet_state, source="smp", arch="unet_resnet18")(jnp.asarray(X), train=False).mask_logits
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in unet_state.items()}}
    torch.save(wrapped, tmp_path / "training.pth")
    safetensors_numpy.save_file(unet_state, str(tmp_path / "model.safetensors"))
    for name in ("training.pth", "model.safetensors"):
        masks = convert(tmp_path / name, source="smp", arch="unet_resnet18")(jnp.asarray(X), train=False).mask_logits
        np.testing.assert_array_equal(masks, reference)


def test_cli_writes_a_checkpoint_that_loads(unet_state, tmp_path):
    torch.save({k: torch.from_numpy(v) for k, v in unet_state.items()}, tmp_path / "unet.pth")
    parser = argparse.ArgumentParser()
    convert_command.add_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "unet.pth"), str(tmp_path / "out"), "--source", "smp", "--arch", "unet_resnet18"]
    )
    assert convert_command.run(args) == 0
    model, config = load_model(tmp_path / "out")
    assert (config.encoder, config.cls_head) == ("resnet18", True)
    expected = convert(unet_state, source="smp", arch="unet_resnet18")(jnp.asarray(X), train=False)
    for ours, reference in zip(model(jnp.asarray(X), train=False), expected):
        np.testing.assert_array_equal(ours, reference)


def test_encoder_checkpoint_initialises_a_unets_encoder(unet_state, tmp_path):
    encoder, encoder_config = convert_with_config(unet_state, source="smp", arch="resnet18")
    save_model(tmp_path / "encoder", encoder, encoder_config)
    config = default_model_config()
    config.update(encoder="resnet18", attention="scse")
    model = build_model(config)
    decoder_before = jax.tree.map(np.asarray, nnx.state(model.decoder))
    load_initial_weights(model, tmp_path / "encoder")
    for ours, reference in zip(jax.tree.leaves(nnx.state(model.encoder)), jax.tree.leaves(nnx.state(encoder))):
        np.testing.assert_array_equal(ours, reference)
    for after, before in zip(jax.tree.leaves(nnx.state(model.decoder)), jax.tree.leaves(decoder_before)):
        np.testing.assert_array_equal(after, before)


def test_checkpoint_of_another_encoder_is_refused(unet_state, tmp_path):
    model, config = convert_with_config(unet_state, source="smp", arch="unet_resnet18")
    save_model(tmp_path / "unet", model, config)
    other_config = copy.deepcopy(config)
    other_config.encoder = "resnet34"
    other = build_unfilled(other_config)
    with pytest.raises(ValueError, match="resnet18"):
        load_initial_weights(other, tmp_path / "unet")


def test_siim_jax_never_imports_torch():
    code = "import sys, siim_jax.models.convert, siim_jax.models.io, siim_jax.models; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
