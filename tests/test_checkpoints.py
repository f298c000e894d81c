"""Checkpoint retention (latest + best k), exact state and iterator restore, and loading for inference."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from siim_jax.configs.defaults import default_config

from siim_jax.config_utils import ConfigError
from siim_jax.models import build_model, build_unfilled
from siim_jax.models import io as model_io
from siim_jax.sharding import data_mesh
from siim_jax.training import optim
from siim_jax.training.checkpoints import TrainingCheckpoints, load_initial_weights, restore_for_inference
from siim_jax.training.state import build_train_state
from tests.tiny_model import TinySegmenter


def small_config(ema: bool = False):
    config = default_config()
    config.model.encoder = "resnet18"
    config.model.decoder_channels = (16, 8, 8, 8, 8)
    config.optim.ema_decay = 0.5 if ema else 0.0
    return config


def filled_state(model_factory, config, value: float):
    """A TrainState of the model's structure with every float array set to `value` (EMA weights: value + 100)."""
    optimizer = optim.build_optimizer(config.optim)
    ema = config.optim.ema_decay > 0
    abstract = jax.eval_shape(lambda: build_train_state(model_factory(), optimizer, 0, ema)[1])
    state = jax.tree.map(lambda s: np.full(s.shape, value, s.dtype), abstract)
    if ema:
        state = state.replace(ema_params=jax.tree.map(lambda x: x + 100, state.ema_params))
    return state


def data_iterator(position: int = 0):
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(position):
        next(iterator)
    return iterator


def tiny_state(value: float):
    return filled_state(lambda: TinySegmenter(rngs=nnx.Rngs(0)), small_config(), value)


def test_keeps_the_latest_and_the_best_k(tmp_path):
    dices = {1: 0.5, 2: 0.9, 3: None, 4: 0.3, 5: 0.8, 6: 0.7, 7: None}
    with TrainingCheckpoints(tmp_path, keep_best=2) as checkpoints:
        for step, dice in dices.items():
            metrics = None if dice is None else {"dice": dice, "auc": 0.5}
            assert checkpoints.save(step, tiny_state(step), small_config(), data_iterator(), metrics)
        assert not checkpoints.save(7, tiny_state(7), small_config(), data_iterator())  # already saved
    with TrainingCheckpoints(tmp_path, read_only=True) as checkpoints:
        assert checkpoints.all_steps() == [2, 5, 7]
        assert checkpoints.best_steps(5) == [2, 5]
        assert checkpoints.metrics(5)["dice"] == pytest.approx(0.8)


def test_ranks_by_postprocessed_dice_and_falls_back_for_older_checkpoints(tmp_path):
    # Planted: the gated and plain Dice rank steps 1 > 2 > 3 > 4 > 5; dice_pp ranks 3 > 2 > 1. Steps 4 and 5 come
    # from before dice_pp (gated Dice) and before dice_gated (plain Dice).
    scores = {
        1: {"dice": 0.9, "dice_gated": 0.9, "dice_pp": 0.70},
        2: {"dice": 0.8, "dice_gated": 0.8, "dice_pp": 0.80},
        3: {"dice": 0.1, "dice_gated": 0.1, "dice_pp": 0.95},
        4: {"dice": 0.2, "dice_gated": 0.75},
        5: {"dice": 0.72},
    }
    with TrainingCheckpoints(tmp_path, keep_best=5) as checkpoints:
        for step, metrics in scores.items():
            checkpoints.save(step, tiny_state(step), small_config(), data_iterator(), metrics)
    with TrainingCheckpoints(tmp_path, read_only=True) as checkpoints:
        assert checkpoints.best_steps(5) == [3, 2, 4, 5, 1]


def test_keeps_the_last_k_besides_the_best(tmp_path):
    dices = {1: 0.9, 2: 0.1, 3: 0.2, 4: None, 5: 0.3, 6: None}
    with TrainingCheckpoints(tmp_path, keep_best=1, keep_last=3) as checkpoints:
        for step, dice in dices.items():
            checkpoints.save(step, tiny_state(step), small_config(), data_iterator(),
                             None if dice is None else {"dice_pp": dice})
    with TrainingCheckpoints(tmp_path, read_only=True) as checkpoints:
        assert checkpoints.all_steps() == [1, 4, 5, 6]


def test_restores_the_state_the_config_and_the_data_position(tmp_path):
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), tiny_state(0))
    config = small_config()
    config.train.epochs = 7
    with TrainingCheckpoints(tmp_path) as checkpoints:
        checkpoints.save(3, state, config, data_iterator(position=42))
    with TrainingCheckpoints(tmp_path) as checkpoints:
        restored = checkpoints.restore_state(3, jax.tree.map(np.zeros_like, state), data_mesh())
        resumed = data_iterator()
        checkpoints.restore_data_iterator(3, resumed)
        assert checkpoints.restore_config(3).train.epochs == 7
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), state)
    assert next(resumed) == 42


def test_a_restored_config_is_checked_against_the_schema(tmp_path):
    config = small_config()
    config.model.attention = "scse"
    config.data.balance.positive_fraction = ((0, 0.8), (10, 0.6))
    config.loss.weights = {"bce": 3.0}
    renamed = ml_collections.ConfigDict(config.to_dict())  # unlocked: a key the schema lacks can be added
    renamed.train.epoch = 7
    with TrainingCheckpoints(tmp_path) as checkpoints:
        checkpoints.save(1, tiny_state(1), config, data_iterator())
        checkpoints.save(2, tiny_state(2), renamed, data_iterator())
    with TrainingCheckpoints(tmp_path, read_only=True) as checkpoints:
        restored = checkpoints.restore_config(1)
        assert restored.model.attention == "scse"
        assert restored.data.balance.positive_fraction == ((0, 0.8), (10, 0.6))  # tuples again, from JSON lists
        assert restored.loss.weights == {"bce": 3.0}  # replaced whole, not merged into the default weights
        with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
            checkpoints.restore_config(2)


def save_unet_run(workdir, ema: bool) -> None:
    config = small_config(ema)
    with TrainingCheckpoints(workdir / "checkpoints", keep_best=2) as checkpoints:
        for step, dice in ((10, 0.6), (20, 0.8), (30, None)):
            state = filled_state(lambda: build_model(config.model), config, float(step))
            checkpoints.save(step, state, config, data_iterator(), None if dice is None else {"dice": dice})


def first_param(model) -> float:
    return float(model.encoder.conv1.kernel[0, 0, 0, 0])


def first_batch_stat(model) -> float:
    return float(model.encoder.bn1.mean[0])


def test_restore_for_inference_from_a_training_run(tmp_path):
    save_unet_run(tmp_path, ema=False)
    latest, config = restore_for_inference(tmp_path)
    assert (first_param(latest), first_batch_stat(latest)) == (30.0, 30.0)
    nnx.jit(lambda model, x: model(x, train=False))(latest, jnp.ones((1, 32, 32, 3)))
    assert first_batch_stat(latest) == 30.0  # inference normalises with the running statistics, leaving them
    assert config.model.encoder == "resnet18" and config.train.keep_best == 3
    assert first_param(restore_for_inference(tmp_path / "checkpoints", step=10)[0]) == 10.0
    assert first_param(restore_for_inference(tmp_path, best=True)[0]) == 20.0
    with pytest.raises(ValueError, match=r"step 5 is not saved .* \[10, 20, 30\]"):
        restore_for_inference(tmp_path, step=5)
    with pytest.raises(ValueError, match="average_top=3 but only 2"):
        restore_for_inference(tmp_path, average_top=3)
    with pytest.raises(ValueError, match="average_last=4 but .* holds 3 checkpoints"):
        restore_for_inference(tmp_path, average_last=4)
    with pytest.raises(ValueError, match="at most one of"):
        restore_for_inference(tmp_path, best=True, average_last=2)
    # The steps' BatchNorm statistics differ (20 and 30): averaged by default, or recomputed, which needs the
    # training images that this run does not have
    last, _ = restore_for_inference(tmp_path, average_last=2)
    assert (first_param(last), first_batch_stat(last)) == (25.0, 25.0)
    with pytest.raises(ValueError, match="needs the run's training images"):
        restore_for_inference(tmp_path, average_last=2, bn_statistics="recompute")
    with pytest.raises(ValueError, match="bn_statistics must be one of"):
        restore_for_inference(tmp_path, average_last=2, bn_statistics="mean")


def test_averaging_means_the_parameters_and_keeps_batch_statistics_that_agree(tmp_path):
    config = small_config()
    with TrainingCheckpoints(tmp_path / "checkpoints", keep_best=2, keep_last=2) as checkpoints:
        for step, dice_pp in ((10, 0.9), (20, 0.5), (30, 0.7)):
            state = filled_state(lambda: build_model(config.model), config, float(step))
            state = state.replace(batch_stats=jax.tree.map(lambda x: np.full_like(x, 7.0), state.batch_stats))
            checkpoints.save(step, state, config, data_iterator(), {"dice_pp": dice_pp})
    top, _ = restore_for_inference(tmp_path, average_top=2)  # steps 10 and 30
    last, _ = restore_for_inference(tmp_path, average_last=2)  # steps 20 and 30
    assert (first_param(top), first_batch_stat(top)) == (20.0, 7.0)
    assert (first_param(last), first_batch_stat(last)) == (25.0, 7.0)


def test_restore_for_inference_takes_the_ema_weights(tmp_path):
    save_unet_run(tmp_path, ema=True)
    model, _ = restore_for_inference(tmp_path, best=True)
    assert (first_param(model), first_batch_stat(model)) == (120.0, 20.0)


def test_restore_for_inference_from_a_model_directory(tmp_path):
    config = small_config()
    model = build_unfilled(config.model)
    weights = nnx.state(model, (nnx.Param, nnx.BatchStat))
    nnx.update(model, jax.tree.map(lambda s: np.full(s.shape, 3.0, s.dtype), weights))
    model_io.save_model(tmp_path / "model", model, config.model)
    loaded, loaded_config = restore_for_inference(tmp_path / "model")
    assert first_param(loaded) == 3.0 and "data" not in loaded_config
    assert loaded_config.model.encoder == "resnet18"
    with pytest.raises(ValueError, match="one set of weights"):
        restore_for_inference(tmp_path / "model", best=True)


def test_initial_weights_from_a_training_run(tmp_path):
    save_unet_run(tmp_path, ema=False)
    model = build_unfilled(small_config().model)
    load_initial_weights(model, tmp_path)
    assert first_param(model) == 20.0  # the best step
