"""The seed's recipe: UNet with a ResNet50 encoder on the real challenge data.

Adam at 1e-5, batch 4, 100 epochs at 512², focal loss (alpha 0.3, gamma 3.5) plus soft Dice, and every positive
with up to 1000 more negatives drawn afresh each epoch. It computes in bfloat16 (the seed used float32), which
accelerators run at several times the speed; `--config.model.dtype=float32` restores the seed's arithmetic.

    siim-jax prepare DATA_ROOT --size 512 --out DATA_ROOT/prepared
    siim-jax train --config unet_resnet50:DATA_ROOT --workdir runs/unet_resnet50 \
        --config.data.prepared_dir=DATA_ROOT/prepared
    (or --config.data.root=DATA_ROOT; add --config.model.init_from=CONVERTED_IMAGENET_DIR for a pretrained encoder)
"""

from siim_jax.configs.defaults import default_config


def get_config(arg=None):
    config = default_config()
    config.model.encoder = "resnet50"
    config.model.cls_head = False
    config.model.dtype = "bfloat16"  # compute; parameters, BatchNorm statistics and the loss stay float32
    config.data.root = arg or ""
    config.data.image_size = 512
    config.data.balance.mode = "difference"
    config.data.balance.max_difference = 1000
    config.loss.weights = {"focal": 1.0, "dice": 1.0}
    config.loss.focal_alpha = 0.3
    config.loss.focal_gamma = 3.5
    config.optim.name = "adam"
    config.optim.lr = 1e-5
    config.optim.schedule = "constant"
    config.train.epochs = 100
    config.train.batch_size = 4
    config.train.eval_batch_size = 16
    config.train.threshold = 0.5
    return config
