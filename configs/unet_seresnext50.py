"""The seed's recipe (see unet_resnet50.py) with an SE-ResNeXt50 32x4d encoder in the Cadene/smp layout.

    siim-jax train --config configs/unet_seresnext50.py:DATA_ROOT --workdir runs/unet_seresnext50
"""

from pathlib import Path

from siim_jax.config_utils import load_config


def get_config(arg=None):
    config = load_config(f"{Path(__file__).with_name('unet_resnet50.py')}:{arg or ''}")
    config.model.encoder = "se_resnext50_32x4d"
    return config
