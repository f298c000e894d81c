"""The optimizer against PyTorch's, the schedules, and the train step's accumulation, EMA and determinism."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from siim_jax.configs import defaults

from siim_jax import sharding
from siim_jax.training import losses, optim
from siim_jax.training.state import build_train_state, make_train_step
from tests.conftest import reference_import
from tests.helpers import gradient_error
from tests.multihost_worker import step_gradient
from tests.tiny_model import TinySegmenter, random_batch

torch = reference_import("torch")


def optim_config(**overrides) -> ml_collections.ConfigDict:
    config = defaults.default_optim_config()
    config.update(overrides)
    return config


def run_optax(config, grads: list[np.ndarray], start: np.ndarray) -> np.ndarray:
    optimizer = optim.build_optimizer(config)
    schedule = optim.make_schedule(config, len(grads))
    params, state = start, optimizer.init(start)
    for step, grad in enumerate(grads):
        updates, state = optimizer.update(grad, optim.with_learning_rate(state, schedule(step)), params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params)


def run_torch(optimizer_class, grads: list[np.ndarray], start: np.ndarray, clip_norm: float, **kwargs) -> np.ndarray:
    param = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = optimizer_class([param], **kwargs)
    for grad in grads:
        param.grad = torch.tensor(grad, dtype=torch.float64)
        if clip_norm:
            torch.nn.utils.clip_grad_norm_([param], clip_norm)
        optimizer.step()
    return param.detach().numpy()


@pytest.mark.parametrize("name, torch_class", [("adam", torch.optim.Adam), ("radam", torch.optim.RAdam)])
def test_optimizer_matches_torch_with_coupled_weight_decay_and_clipping(name, torch_class):
    rng = np.random.default_rng(0)
    start = rng.normal(size=5)
    grads = [rng.normal(size=5) * 3 for _ in range(12)]
    config = optim_config(name=name, lr=0.01, weight_decay=0.1, clip_norm=2.0)
    with jax.enable_x64(True):
        ours = run_optax(config, grads, start)
    theirs = run_torch(torch_class, grads, start, 2.0, lr=0.01, weight_decay=0.1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)  # torch clips by max_norm / (norm + 1e-6)


def test_schedules():
    cosine_config = optim_config(schedule="warmup_cosine", lr=1.0, warmup_steps=10, final_lr_fraction=0.1)
    cosine = optim.make_schedule(cosine_config, 110)
    steps = [0, 5, 10, 60, 110]
    np.testing.assert_allclose([cosine(step) for step in steps], [0, 0.5, 1, 0.55, 0.1], atol=1e-6)
    constant = optim.make_schedule(optim_config(lr=2.0, warmup_steps=4), 100)
    np.testing.assert_allclose([constant(0), constant(2), constant(4), constant(99)], [0, 1, 2, 2], atol=1e-6)
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.make_schedule(optim_config(schedule="step"), 10)


def test_plateau_matches_torch_reduce_on_plateau():
    config = optim_config(schedule="plateau", lr=1.0, plateau_factor=0.5, plateau_patience=2, plateau_min_scale=0.1)
    dices = [0.1, 0.2, 0.2, 0.15, 0.19, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    param = torch.nn.Parameter(torch.zeros(1))
    torch_optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch_optimizer, mode="max", factor=0.5, patience=2, threshold=0.0, min_lr=0.1
    )
    plateau = optim.PlateauState.initial()
    for dice in dices:
        plateau = optim.plateau_update(plateau, dice, config)
        scheduler.step(dice)
        assert float(plateau.scale) == pytest.approx(torch_optimizer.param_groups[0]["lr"])
    assert float(plateau.scale) == pytest.approx(0.1)
    unchanged = optim.plateau_update(optim.PlateauState.initial(), 0.0, optim_config(schedule="constant"))
    assert float(unchanged.scale) == 1.0


def train(model, batches, *, grad_accum=1, ema_decay=0.0, seed=0):
    """Params (and EMA params) after one step per batch on a 1-device mesh."""
    mesh = sharding.data_mesh(jax.devices()[:1])
    config = optim_config(lr=0.05, ema_decay=ema_decay)
    optimizer = optim.build_optimizer(config)
    model_def, state = build_train_state(model, optimizer, seed, ema=ema_decay > 0)
    state = sharding.replicate(state, mesh)
    step = make_train_step(
        model_def, losses.make_loss({"cls_weight": 0.5}), optimizer, optim.make_schedule(config, 10), mesh,
        grad_accum=grad_accum, ema_decay=ema_decay,
    )
    history = []
    for batch in batches:
        state, metrics = step(state, batch)
        history.append(jax.device_get(state.params))
    return jax.device_get(state), history


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_gradient_accumulation_equals_the_whole_batch_without_batch_norm():
    batches = [random_batch(seed, 8) for seed in range(2)]
    whole, _ = train(TinySegmenter(batch_norm=False, dropout=0.0, rngs=nnx.Rngs(0)), batches)
    accumulated, _ = train(TinySegmenter(batch_norm=False, dropout=0.0, rngs=nnx.Rngs(0)), batches, grad_accum=4)
    np.testing.assert_allclose(flat(accumulated.params), flat(whole.params), atol=1e-6)
    # the gradients themselves, whose scale Adam's update hides
    mesh = sharding.data_mesh(jax.devices()[:1])
    gradient = {
        accum: step_gradient(TinySegmenter(batch_norm=False, dropout=0.0, rngs=nnx.Rngs(0)), accum, mesh, batches[0])
        for accum in (1, 2, 4)
    }
    for accum in (2, 4):
        error = gradient_error(gradient[accum], gradient[1])
        assert error <= 1, f"{accum} micro-batches: gradient off by {error:.3g} times its bound"


def test_ema_follows_its_formula():
    batches = [random_batch(seed, 4) for seed in range(3)]
    state, history = train(TinySegmenter(rngs=nnx.Rngs(0)), batches, ema_decay=0.9)
    _, params0, _ = nnx.split(TinySegmenter(rngs=nnx.Rngs(0)), nnx.Param, ...)
    ema = flat(params0)
    for step, params in enumerate(history):
        decay = min(0.9, (1 + step) / (10 + step))
        ema = decay * ema + (1 - decay) * flat(params)
    np.testing.assert_allclose(flat(state.ema_params), ema, rtol=1e-5, atol=1e-7)


def test_dropout_keys_come_from_the_seed_and_step():
    batches = [random_batch(seed, 4) for seed in range(2)]
    first, _ = train(TinySegmenter(rngs=nnx.Rngs(0)), batches, seed=1)
    again, _ = train(TinySegmenter(rngs=nnx.Rngs(0)), batches, seed=1)
    other, _ = train(TinySegmenter(rngs=nnx.Rngs(0)), batches, seed=2)
    np.testing.assert_array_equal(flat(first.params), flat(again.params))
    assert not np.allclose(flat(first.params), flat(other.params))
