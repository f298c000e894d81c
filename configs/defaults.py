"""The config schema: every section's fields with their defaults. Recipes start from `default_config()`.

Plain ml_collections and the standard library only, so that a config loads without the data pipeline or JAX.
Fields that take more than one shape are declared as `FieldReference`s of type `object` (any value fits, and
`--config.a.b=...` parses it as a Python literal); a field that may stay unset is a `placeholder` of its type.
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict


def default_model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "encoder": "resnet50",  # a key of siim_jax.models.ENCODERS
            "encoder_only": False,  # the bare encoder (returns its five feature maps), as converted from ImageNet
            "classes": 1,
            "decoder_channels": (256, 128, 64, 32, 16),
            "attention": config_dict.placeholder(str),  # None, or "scse"
            "cls_head": True,  # classification head on the deepest feature (smp's aux_params)
            "cls_dropout": 0.2,
            "dtype": "float32",  # compute dtype (or bfloat16); parameters and BatchNorm statistics stay float32
            "remat": False,
            # Speed variants (issue 22), equal up to round-off; each stays off until a GPU run shows it faster.
            "norm": "flax",  # BatchNorm: "flax" (two-pass statistics) or "fused" (one pass, fused with ReLU/residual)
            "stem": "rgb",  # first conv on 3 channels: "rgb", "pad4" (a zero 4th channel) or "grey" (folded to 1)
            "maxpool": "reduce_window",  # stem max pool: "reduce_window" or "slices" (its gradient is a select)
            "init_from": "",  # a checkpoint written by `siim-jax convert` or by training
        }
    )


def default_augment_config() -> ml_collections.ConfigDict:
    """The seed's train pipeline: HorizontalFlip, ShiftScaleRotate(0, 0.1, 10, constant border), GaussNoise."""
    return ml_collections.ConfigDict(
        {
            "hflip_p": 0.5,
            "affine_p": 0.5,
            "scale": 0.1,  # zoom drawn from [1 - scale, 1 + scale]
            "rotate": 10.0,  # degrees, drawn from [-rotate, rotate]
            "shift": 0.0,  # translation as a fraction of the side, drawn from [-shift, shift]
            "noise_p": 0.5,
            # std as a fraction of 255 at 1024²: the seed's GaussNoise(var_limit=(10, 50)) in grey levels
            "noise_std_range": (math.sqrt(10.0) / 255.0, math.sqrt(50.0) / 255.0),
        }
    )


def default_data_config() -> ml_collections.ConfigDict:
    """See siim_jax.data.pipeline for what each field does."""
    return ml_collections.ConfigDict(
        {
            "root": "",
            "labels_csv": "",
            "prepared_dir": "",
            "image_size": 512,
            "fold": 0,
            "n_folds": 5,
            "fold_seed": 0,
            "strict": False,
            "balance": {
                "mode": "difference",
                "max_difference": 1000,
                # a fraction, or a schedule ((start_epoch, fraction), ...)
                "positive_fraction": ml_collections.FieldReference(((0, 0.8), (10, 0.6), (20, 0.4)), object),
            },
            "augment": default_augment_config(),
            # 'auto' (the cores this process may use less one, at most 8), or a count; 0 loads in-process
            "workers": ml_collections.FieldReference("auto", object),
            "prefetch": 2,
            "batch_timeout_s": 300.0,  # no batch for this long stops training, naming the stage that waits
            "seed": 0,
        }
    )


def default_loss_config() -> ml_collections.ConfigDict:
    """The keys of siim_jax.training.losses.make_loss; `weights` maps mask-loss parts to weights, replaced whole."""
    return ml_collections.ConfigDict(
        {
            "weights": ml_collections.FieldReference({"focal": 1.0, "dice": 1.0}, object),
            "focal_alpha": ml_collections.FieldReference(0.3, object),  # weight of positive pixels; None: no weighting
            "focal_gamma": 3.5,
            "dice_per_image": True,
            "dice_smooth": 1.0,
            "wsd_v1": 0.1,  # weight of background pixels in the weighted soft Dice
            "wsd_v2": 0.9,  # weight of foreground pixels in the weighted soft Dice
            "wsd_smooth": 1.0,
            "cls_weight": 0.0,  # > 0 adds classification_loss on the image-level head as component 'cls'
        }
    )


def default_optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "adam",  # one of siim_jax.training.optim.OPTIMIZERS
            "lr": 1e-4,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,  # coupled L2 added to the gradient, as torch.optim.Adam(weight_decay=...)
            "clip_norm": 0.0,  # global-norm clipping of the gradient; 0 = off
            "flatten": False,  # speed variant: one global norm, and the update on one flat vector (optax.flatten)
            "schedule": "constant",  # one of siim_jax.training.optim.SCHEDULES
            "warmup_steps": 0,  # linear warm-up from 0, for every schedule
            "final_lr_fraction": 0.0,  # warmup_cosine ends at lr * final_lr_fraction
            "plateau_factor": 0.5,  # plateau: multiply the rate by this when validation Dice stalls ...
            "plateau_patience": 3,  # ... for this many evaluations ...
            "plateau_min_scale": 0.01,  # ... but never below lr * plateau_min_scale
            "ema_decay": 0.0,  # exponential moving average of the weights; 0 = off
        }
    )


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
            "keep_best": 3,  # checkpoints kept by validation 'dice_pp' (training.checkpoints), besides the latest
            "keep_last": 1,  # the latest checkpoints kept (for resuming, and for averaging them: --average-last)
            "seed": 0,  # model init and dropout
        }
    )


def default_config() -> ml_collections.ConfigDict:
    """The schema, locked: assigning a key it lacks raises."""
    config = ml_collections.ConfigDict(
        {
            "model": default_model_config(),
            "data": default_data_config(),
            "loss": default_loss_config(),
            "optim": default_optim_config(),
            "train": default_train_config(),
        }
    )
    config.lock()
    return config
