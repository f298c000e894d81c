"""The 2019 winner's recipe (sneddy): SE-ResNeXt50 UNet, ComboLoss, a falling positive fraction, 512² then 1024².

ComboLoss weights bce 3 / dice 1 / focal 4; each epoch holds every positive and enough negatives that positives
make 80% of it, then 60% from epoch 10 and 40% from epoch 20; Adam 1e-4 with warm-up and cosine decay; the best
three checkpoints are kept for averaging (`siim-jax predict --average-top 3`). Stage '1024' fine-tunes the stage
'512' run at full size, starting from its best checkpoint:

    siim-jax prepare DATA_ROOT --size 512 --out DATA_ROOT/prepared  # and --size 1024 for stage '1024'
    siim-jax train --config unet_winner:512 --workdir runs/winner512 --config.data.prepared_dir=DATA_ROOT/prepared
    siim-jax train --config unet_winner:1024 --workdir runs/winner1024 \
        --config.data.prepared_dir=DATA_ROOT/prepared --config.model.init_from=runs/winner512
"""

from siim_jax.configs.defaults import default_config

STAGES = {
    # image size, global batch, micro-batches, epochs, peak learning rate
    "512": (512, 8, 1, 50, 1e-4),
    "1024": (1024, 8, 4, 20, 5e-5),
}


def get_config(arg=None):
    stage = arg or "512"
    if stage not in STAGES:
        raise ValueError(f"unet_winner.py takes a stage, one of {sorted(STAGES)}; got {arg!r}")
    image_size, batch_size, grad_accum, epochs, lr = STAGES[stage]
    config = default_config()
    config.model.encoder = "se_resnext50_32x4d"
    config.model.cls_head = False
    config.model.dtype = "bfloat16"  # compute; parameters, BatchNorm statistics and the loss stay float32
    config.data.image_size = image_size
    config.data.balance.mode = "fraction"
    config.data.balance.positive_fraction = ((0, 0.8), (10, 0.6), (20, 0.4))
    config.loss.weights = {"bce": 3.0, "dice": 1.0, "focal": 4.0}
    config.optim.name = "adam"
    config.optim.lr = lr
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_steps = 500
    config.optim.final_lr_fraction = 0.01
    config.train.epochs = epochs
    config.train.batch_size = batch_size
    config.train.grad_accum = grad_accum
    config.train.eval_batch_size = 8
    config.train.keep_best = 3
    return config
