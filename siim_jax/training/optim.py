"""Optimizers and learning-rate schedules from `config.optim`.

The optimizer built here takes its learning rate as an injected hyperparameter (`optax.inject_hyperparams`): the
train step sets it to `schedule(step) * plateau.scale` before each update, where `plateau` is the reduce-on-plateau
state carried in the train state and stepped after each evaluation.

The plateau rule is ours, not `optax.contrib.reduce_on_plateau`: that one refuses rtol = atol = 0, so it cannot
count every strict improvement as one (PyTorch's `ReduceLROnPlateau(threshold=0)`, which the reference training
uses), and it reduces after `patience` bad evaluations where PyTorch waits for `patience + 1`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

SCHEDULES = ("constant", "warmup_cosine", "plateau")
OPTIMIZERS = ("adam", "radam")


def build_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """Gradient → update: [clip by global norm] → [+ weight_decay * param] → Adam or RAdam moments → × -lr,
    [all on the parameters flattened into one vector (`optim_config.flatten`)].

    Clipping comes first and the decay is added after it, as `clip_grad_norm_` then `Adam(weight_decay=...)`
    do in PyTorch. The learning rate is `opt_state.hyperparams['learning_rate']`, set by the train step.
    """
    if optim_config.name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {optim_config.name!r}")
    moments = {"adam": optax.scale_by_adam, "radam": optax.scale_by_radam}[optim_config.name]
    parts = []
    if optim_config.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_config.clip_norm))
    if optim_config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(optim_config.weight_decay))
    parts.append(moments(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps))

    @optax.inject_hyperparams
    def optimizer(learning_rate):
        return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))

    optimizer = optimizer(learning_rate=optim_config.lr)
    # flatten: the update runs on one vector, a few kernels instead of a few per parameter; its moments are one
    # vector too, so a checkpoint's optimizer state only resumes under the same setting.
    return optax.flatten(optimizer) if optim_config.flatten else optimizer


def gradient_norm(grads, flatten: bool) -> jax.Array:
    """The global norm of `grads`, as logged. With `flatten`, it is taken on the vector that `optax.flatten` builds
    (its leaves in tree order, concatenated), the same expression as the clipping's norm inside the flattened
    optimizer, so XLA computes one reduction for both (common-subexpression elimination; tests/test_variants.py
    counts it). Otherwise one reduction per parameter."""
    if flatten:
        grads = jnp.concatenate([jnp.reshape(leaf, [-1]) for leaf in jax.tree.leaves(grads)])
    return optax.tree.norm(grads)


def with_learning_rate(opt_state: optax.OptState, learning_rate) -> optax.OptState:
    """The state of a `build_optimizer` optimizer with the learning rate of its next update set."""
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": learning_rate})


def make_schedule(optim_config: ml_collections.ConfigDict, total_steps: int) -> Callable:
    """step → base learning rate (before the plateau factor)."""
    if optim_config.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {optim_config.schedule!r}")
    lr, warmup = optim_config.lr, optim_config.warmup_steps
    if optim_config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(total_steps, warmup + 1), end_value=lr * optim_config.final_lr_fraction
        )
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


@flax.struct.dataclass
class PlateauState:
    """Reduce-on-plateau bookkeeping, kept in the train state so that a resumed run continues it."""

    scale: jnp.ndarray  # float32 factor on the learning rate
    best: jnp.ndarray  # float32 best validation Dice seen
    bad_evaluations: jnp.ndarray  # int32 evaluations since `best` last improved

    @classmethod
    def initial(cls) -> PlateauState:
        return cls(np.float32(1.0), np.float32(-np.inf), np.int32(0))


def plateau_update(plateau: PlateauState, dice: float, optim_config: ml_collections.ConfigDict) -> PlateauState:
    """Host-side update after an evaluation, like torch's ReduceLROnPlateau(mode='max', threshold=0).

    A NaN Dice counts as no improvement. Schedules other than 'plateau' keep the scale at 1.
    """
    if optim_config.schedule != "plateau":
        return plateau
    best, bad, scale = float(plateau.best), int(plateau.bad_evaluations), float(plateau.scale)
    if dice > best:
        best, bad = dice, 0
    else:
        bad += 1
    if bad > optim_config.plateau_patience:
        scale, bad = max(scale * optim_config.plateau_factor, optim_config.plateau_min_scale), 0
    return PlateauState(np.float32(scale), np.float32(best), np.int32(bad))
