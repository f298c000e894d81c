"""The train state pytree and the jitted train and eval steps over it.

The nnx model is split once into its static graph definition and array state; the steps are plain `jax.jit`
functions that `nnx.merge` the model inside, so each call costs no graph traversal in Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from siim_jax import metrics as metrics_lib
from siim_jax import sharding as sharding_lib
from siim_jax.data.augment import model_input, model_mask
from siim_jax.models import SegOutput
from siim_jax.training.optim import PlateauState, gradient_norm, with_learning_rate

TRAIN_INPUTS = ("image", "mask", "positive")  # the batch entries a train step reads
EVAL_INPUTS = ("image", "mask", "valid")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    ema_params: nnx.State | None  # None when EMA is off
    rng: jax.Array  # uint32[2] base key; each step's dropout key folds in the step and micro-batch index
    plateau: PlateauState

    @property
    def eval_params(self) -> nnx.State:
        """The weights to evaluate and export: the EMA when it is on."""
        return self.params if self.ema_params is None else self.ema_params


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of an nnx model and its dropout RNG streams."""

    graph: nnx.GraphDef
    rng_template: nnx.State  # RngKey / RngCount variables; reseeded in every call
    rng_streams: tuple[str, ...]

    @classmethod
    def split(cls, model: nnx.Module) -> tuple[ModelDef, nnx.State, nnx.State]:
        """(ModelDef, params, batch_stats) of `model`."""
        graph, params, batch_stats, rng_template = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        flat = nnx.to_flat_state(rng_template)
        streams = sorted({variable.tag for _, variable in flat if isinstance(variable, nnx.RngKey)})
        return cls(graph, rng_template, tuple(streams)), params, batch_stats

    def apply(self, params, batch_stats, images, *, train: bool, dropout_key=None) -> tuple[SegOutput, nnx.State]:
        """(the model's `SegOutput`, batch_stats after the call: updated when `train`)."""
        # Fresh variables: nnx refuses to update a variable created outside the current trace (a scan, a grad).
        batch_stats, rng_state = jax.tree.map(jnp.asarray, (batch_stats, self.rng_template))
        model = nnx.merge(self.graph, params, batch_stats, rng_state)
        if train and self.rng_streams:
            nnx.reseed(model, **{name: jax.random.fold_in(dropout_key, i) for i, name in enumerate(self.rng_streams)})
        return model(images, train=train), nnx.state(model, nnx.BatchStat)


def build_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, seed: int, ema: bool):
    """(ModelDef, TrainState at step 0) from an initialised model; arrays stay where the model has them."""
    model_def, params, batch_stats = ModelDef.split(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        rng=jax.random.key_data(jax.random.key(seed)),
        plateau=PlateauState.initial(),
    )
    return model_def, state


def split_micro_batches(batch: dict, count: int, mesh: Mesh) -> dict:
    """(B, ...) → (count, B / count, ...), micro-batch k holding rows k, k + count, ...

    The interleaving keeps each device's rows on that device when its share B / devices divides by `count`.
    """
    sharding = NamedSharding(mesh, PartitionSpec(None, sharding_lib.DATA_AXIS))

    def split(x):
        if x.shape[0] % count:
            raise ValueError(f"batch of {x.shape[0]} does not split into {count} micro-batches")
        x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(split, batch)


def ema_update(ema_params, params, decay: float, step):
    """EMA with the decay warmed up as min(decay, (1 + step) / (10 + step)), so short runs average recent weights."""
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def make_train_step(
    model_def: ModelDef,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    schedule: Callable,
    mesh: Mesh,
    *,
    grad_accum: int = 1,
    ema_decay: float = 0.0,
    flatten: bool = False,
):
    """`step(state, batch) -> (state, metrics)`, jitted over `mesh` with the state donated.

    `batch` holds TRAIN_INPUTS, batch-sharded: uint8 images and masks as the pipeline gives them (normalised here,
    `augment.model_input`), or float NHWC images and float masks. The gradient is the mean over `grad_accum`
    micro-batches, run one after another by `lax.scan` so that only one micro-batch's activations are alive;
    BatchNorm normalises each micro-batch with its own statistics and updates the running ones once per
    micro-batch, as PyTorch does across accumulated backward passes. Metrics (loss, its components, grad_norm,
    lr) are replicated scalars. `optimizer` takes its learning rate as a hyperparameter (`optim.build_optimizer`);
    each step injects `schedule(step) * plateau.scale`. `flatten` says that `optimizer` was built with
    `optim.flatten` set, so that the logged grad_norm reuses its clipping's norm (`optim.gradient_norm`).
    """

    def loss_on(params, batch_stats, micro, key):
        (mask_logits, class_logits), batch_stats = model_def.apply(
            params, batch_stats, model_input(micro["image"]), train=True, dropout_key=key
        )
        loss, components = loss_fn(mask_logits, model_mask(micro["mask"]), class_logits, micro["positive"])
        return loss, (components, batch_stats)

    grad_fn = jax.value_and_grad(loss_on, has_aux=True)

    def gradients(params, batch_stats, batch, key):
        """(mean gradient, batch_stats, mean metrics) over the micro-batches."""
        if grad_accum == 1:  # no scan: XLA:CPU runs a loop body's convolutions far slower than the same ops unrolled
            (loss, (components, batch_stats)), grads = grad_fn(params, batch_stats, batch, key)
            return grads, batch_stats, {"loss": loss, **components}

        def accumulate(carry, indexed_micro):
            grads_sum, batch_stats = carry
            index, micro = indexed_micro
            micro_key = jax.random.fold_in(key, index)
            (loss, (components, batch_stats)), grads = grad_fn(params, batch_stats, micro, micro_key)
            return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), {"loss": loss, **components}

        init = (jax.tree.map(jnp.zeros_like, params), batch_stats)
        micro_batches = split_micro_batches(batch, grad_accum, mesh)
        (grads_sum, batch_stats), metrics = jax.lax.scan(accumulate, init, (jnp.arange(grad_accum), micro_batches))
        return jax.tree.map(lambda g: g / grad_accum, grads_sum), batch_stats, {k: v.mean() for k, v in metrics.items()}

    def step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grads, batch_stats, metrics = gradients(state.params, state.batch_stats, batch, key)
        lr = schedule(state.step) * state.plateau.scale
        updates, opt_state = optimizer.update(grads, with_learning_rate(state.opt_state, lr), state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = None if state.ema_params is None else ema_update(state.ema_params, params, ema_decay, state.step)
        metrics.update(grad_norm=gradient_norm(grads, flatten), lr=lr)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema_params=ema_params
        )
        return new_state, metrics

    replicated = sharding_lib.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, sharding_lib.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def make_eval_step(model_def: ModelDef, mesh: Mesh, threshold: float):
    """`eval_step(params, batch_stats, batch) -> per-image stats`, replicated so every process can read them.

    `batch` holds EVAL_INPUTS (uint8 or float, as for the train step); the stats are `metrics.per_image_stats`
    plus 'valid' (False on padding rows).
    """

    def step(params, batch_stats, batch):
        images, masks = model_input(batch["image"]), model_mask(batch["mask"])
        (mask_logits, class_logits), _ = model_def.apply(params, batch_stats, images, train=False)
        class_probs = None if class_logits is None else jax.nn.sigmoid(class_logits)
        stats = metrics_lib.per_image_stats(jax.nn.sigmoid(mask_logits), masks, threshold, class_probs)
        return {**stats, "valid": batch["valid"]}

    replicated = sharding_lib.replicated(mesh)
    return jax.jit(
        step, in_shardings=(replicated, replicated, sharding_lib.batch_sharding(mesh)), out_shardings=replicated
    )
