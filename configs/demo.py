"""A demo small enough for 2 CPU cores: a ResNet18 UNet at 128² trained for a few minutes on a synthetic set.

    siim-jax synth runs/synth --n-train 300 --n-test 20
    siim-jax train --config demo:runs/synth --workdir runs/demo
"""

from siim_jax.configs.defaults import default_config


def get_config(arg=None):
    config = default_config()
    config.model.encoder = "resnet18"
    config.model.decoder_channels = (64, 32, 16, 16, 8)
    config.model.cls_head = True
    config.model.cls_dropout = 0.2
    # bfloat16 is no faster on a CPU (a train step here took the same time in both, even with AVX512-BF16), and
    # float32 keeps the demo's figures comparable from run to run
    config.model.dtype = "float32"
    config.data.root = arg or ""
    config.data.image_size = 128
    config.data.balance.mode = "fraction"
    config.data.balance.positive_fraction = ((0, 0.5),)
    config.loss.weights = {"focal": 1.0, "dice": 1.0}
    config.loss.cls_weight = 0.2
    config.optim.name = "adam"
    config.optim.lr = 1e-3
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_steps = 30
    config.optim.final_lr_fraction = 0.01
    config.train.epochs = 20
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.eval_every_epochs = 2  # and after the last epoch: half the evaluations, a minute less in all
    config.train.log_every_steps = 10
    config.train.keep_best = 2
    config.train.eval_at_start = True
    return config
