"""Configs: the packaged recipes load by name or by path without the heavy modules, and config_flags' overrides
set the fields that take several shapes."""

import subprocess
import sys
from importlib.resources import files

import pytest

from siim_jax.config_utils import ConfigError, load_config, packaged_configs

HEAVY = ("jax", "grain", "cv2", "pydicom", "tensorflow_datasets", "siim_jax.data", "siim_jax.models")


def test_every_recipe_loads_without_the_heavy_modules():
    script = (
        "import sys; from siim_jax.config_utils import load_config, packaged_configs\n"
        "for name in packaged_configs(): load_config(name)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"
    assert packaged_configs() == ["demo", "unet_resnet50", "unet_seresnext50", "unet_winner"]


def test_a_recipe_by_name_and_by_path_with_its_argument():
    by_path = load_config(f"{files('siim_jax.configs') / 'unet_winner.py'}:1024")
    by_name = load_config("unet_winner:1024")
    assert by_path.to_dict() == by_name.to_dict()
    # the winner's stage 2: 1024², batch 8 in 4 micro-batches, 20 epochs at 5e-5
    assert (by_name.data.image_size, by_name.train.batch_size, by_name.train.grad_accum) == (1024, 8, 4)
    assert (by_name.train.epochs, by_name.optim.lr) == (20, 5e-5)
    assert load_config("unet_seresnext50:DATA").data.root == "DATA"


def test_overrides_of_fields_with_several_shapes():
    config = load_config("demo", [
        "--config.data.balance.positive_fraction=((0,0.5),(10,0.3))",
        "--config.loss.weights={'bce':1.0}",
        "--config.loss.focal_alpha=None",
        "--config.model.attention=scse",
        "--config.model.decoder_channels=(16,8,8,8,8)",
    ])
    assert config.data.balance.positive_fraction == ((0, 0.5), (10, 0.3))
    assert config.loss.weights == {"bce": 1.0}  # replaced whole: no focal or dice left from the recipe
    assert config.loss.focal_alpha is None
    assert (config.model.attention, config.model.decoder_channels) == ("scse", (16, 8, 8, 8, 8))
    assert load_config("demo", ["--config.data.balance.positive_fraction=0.4"]).data.balance.positive_fraction == 0.4


def test_gpu_recipes_compute_in_bfloat16_and_load_with_automatic_workers():
    for name in ("unet_resnet50", "unet_seresnext50", "unet_winner:512", "unet_winner:1024"):
        config = load_config(name)
        assert config.model.dtype == "bfloat16", name
        assert config.data.workers == "auto", name
    assert load_config("demo").model.dtype == "float32"  # the CPU demo: bfloat16 is no faster on a CPU
    assert load_config("demo", ["--config.data.workers=3"]).data.workers == 3


def test_each_call_parses_its_own_overrides():
    assert load_config("demo", ["--config.train.epochs=3"]).train.epochs == 3
    assert load_config("demo").train.epochs == 20


@pytest.mark.parametrize("spec, error", [
    ("nope", "no packaged config named 'nope'"),
    ("defaults", "no packaged config named 'defaults'"),
    ("unet_winner:256", "takes a stage"),
])
def test_bad_config_names(spec, error):
    with pytest.raises(ConfigError, match=error):
        load_config(spec)
