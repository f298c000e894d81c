"""The seed's recipe (see unet_resnet50.py) with an SE-ResNeXt50 32x4d encoder in the Cadene/smp layout.

    siim-jax train --config unet_seresnext50:DATA_ROOT --workdir runs/unet_seresnext50 \
        --config.data.prepared_dir=DATA_ROOT/prepared
"""

from siim_jax.configs import unet_resnet50


def get_config(arg=None):
    config = unet_resnet50.get_config(arg)
    config.model.encoder = "se_resnext50_32x4d"
    return config
