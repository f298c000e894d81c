"""End-to-end training on a small synthetic set: it learns, resumes exactly after SIGTERM, and stops on NaN.

The resume and NaN runs use `tests.tiny_model` in place of the UNet (they test the loop, not the network); the
learning check trains the real UNet.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from siim_jax import cli, config_utils
from siim_jax.commands import train as train_command
from siim_jax.data import pipeline
from siim_jax.data.augment import model_input
from siim_jax.training import loop as train
from siim_jax.training.checkpoints import TrainingCheckpoints, restore_for_inference
from siim_jax.training.logging import read_history
from tests.test_train_logging import read_events

EPOCHS, STEPS_PER_EPOCH = 3, 4


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs of one config compile the same steps; the persistent cache makes every run after the first cheap."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(scope="module")
def synthetic_root(synthetic_trees):
    return synthetic_trees(24, seed=5, positive_fraction=0.5, difficulty=0.0)


def small_config(root, image_size: int = 32, **train_overrides):
    """The demo config shrunk: 16 training images without augmentation, 4 steps an epoch, 8 validation images."""
    config = config_utils.load_config(f"demo:{root}")
    config.model.decoder_channels = (16, 8, 8, 8, 8)
    config.data.image_size = image_size
    config.data.n_folds = 3
    config.data.balance.mode = "none"
    config.data.prefetch = 1
    config.data.augment.update(hflip_p=0.0, affine_p=0.0, noise_p=0.0)
    config.loss.weights = {"bce": 1.0, "dice": 1.0}
    config.optim.update(lr=3e-3, warmup_steps=2)
    config.train.update(
        {"epochs": EPOCHS, "batch_size": 4, "eval_batch_size": 8, "log_every_steps": 2, **train_overrides}
    )
    return config


def final_weights(workdir) -> list:
    """(path, array) of the latest checkpoint's parameters and batch statistics."""
    model, _ = restore_for_inference(workdir)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    return [(path, np.asarray(leaf)) for path, leaf in leaves]


def wrap_train_step(monkeypatch, action):
    """Makes the loop's train step call `action(call_number, batch) -> batch` before each step."""
    make = train.make_train_step

    def make_wrapped(*args, **kwargs):
        step_fn = make(*args, **kwargs)
        calls = itertools.count(1)
        return lambda state, batch: step_fn(state, action(next(calls), batch))

    monkeypatch.setattr(train, "make_train_step", make_wrapped)


def test_training_lowers_the_loss_and_raises_the_validation_dice(synthetic_root, tmp_path):
    config = small_config(synthetic_root, epochs=10, eval_every_epochs=5)  # 40 steps of the ResNet18 UNet at 32²
    result = train.train_and_evaluate(config, tmp_path)
    history = read_history(tmp_path / "metrics.jsonl")
    losses = [record["train/loss"] for record in history if "train/loss" in record]
    val = [record for record in history if "val/dice" in record]
    assert result["step"] == 10 * STEPS_PER_EPOCH and result["stopped_by"] is None
    assert [record["step"] for record in val] == [0, 20, 40]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])  # the last 10 steps against the first 10
    assert val[-1]["val/dice"] > val[0]["val/dice"] + 0.1
    assert val[-1]["val/dice_positive"] > val[0]["val/dice_positive"]
    assert result["dice"] == pytest.approx(val[-1]["val/dice"])
    assert (tmp_path / "curves.png").stat().st_size > 0
    events = read_events(tmp_path / "tensorboard")
    assert [event.value for event in events.Scalars("val/dice")] == pytest.approx([r["val/dice"] for r in val])
    assert [image.step for image in events.Images("val/contours")] == [20, 40]
    assert events.Tensors("config/text_summary")


def test_resuming_after_sigterm_reaches_the_uninterrupted_weights(tiny_model, synthetic_root, tmp_path, monkeypatch):
    config = small_config(synthetic_root)
    uninterrupted = train.train_and_evaluate(config, tmp_path / "uninterrupted")

    def terminate_at_step_6(call, batch):
        if call == 6:  # mid-epoch: the resumed run must restore the data iterator's position
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    with monkeypatch.context() as patch:
        wrap_train_step(patch, terminate_at_step_6)
        stopped = train.train_and_evaluate(config, tmp_path / "resumed")
    assert stopped["stopped_by"] == "SIGTERM" and stopped["step"] == 6
    with pytest.raises(config_utils.ConfigError) as refused:  # other batches and another schedule: another run
        train.train_and_evaluate(small_config(synthetic_root, batch_size=2, epochs=EPOCHS + 1), tmp_path / "resumed")
    assert "train.batch_size: 4 saved, 2 now" in str(refused.value)
    assert f"train.epochs: {EPOCHS} saved, {EPOCHS + 1} now" in str(refused.value)
    moved = small_config(synthetic_root, log_every_steps=1)  # logging and loading may change on resume:
    moved.data.workers = 0  # the stopped run loaded with workers='auto', the cores less one
    resumed = train.train_and_evaluate(moved, tmp_path / "resumed")
    assert resumed["step"] == EPOCHS * STEPS_PER_EPOCH and resumed["stopped_by"] is None
    expected = final_weights(tmp_path / "uninterrupted")
    for (path, actual), (_, wanted) in zip(final_weights(tmp_path / "resumed"), expected, strict=True):
        np.testing.assert_allclose(actual, wanted, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert resumed["dice"] == pytest.approx(uninterrupted["dice"])


def test_the_progress_bar_counts_steps_only_once_their_metrics_came_back(
    tiny_model, synthetic_root, tmp_path, monkeypatch
):
    events = []  # "fetch" for each metrics fetch, the bar's new position for each move
    fetch = train.PendingMetrics.flush
    monkeypatch.setattr(train.PendingMetrics, "flush", lambda self, *args: events.append("fetch") or fetch(self, *args))

    class Bar(train.tqdm):
        def update(self, n=1):
            events.append(self.n + n)
            return super().update(n)

    monkeypatch.setattr(train, "tqdm", Bar)
    train.train_and_evaluate(small_config(synthetic_root, epochs=2, log_every_steps=3), tmp_path)
    assert [event for event in events if event != "fetch"] == [3, 4, 6, 8]  # log steps and epoch ends
    assert all(events[i - 1] == "fetch" for i, event in enumerate(events) if event != "fetch")


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tiny_model, synthetic_root, tmp_path, monkeypatch
):
    def poison_step_3(call, batch):
        return {**batch, "image": model_input(batch["image"]) * jnp.nan} if call == 3 else batch

    wrap_train_step(monkeypatch, poison_step_3)
    config = small_config(synthetic_root, checkpoint_every_steps=1, log_every_steps=100, eval_at_start=False)
    with pytest.raises(train.NonFiniteLossError, match="at step 3"):
        train.train_and_evaluate(config, tmp_path)
    with TrainingCheckpoints(tmp_path / "checkpoints", read_only=True) as checkpoints:
        assert checkpoints.latest_step() == 2
    assert all(np.isfinite(leaf).all() for _, leaf in final_weights(tmp_path))


def parsed(argv: list[str]) -> argparse.Namespace:
    module, args = cli.parse_command(["train", *argv])
    assert module is train_command
    return args


def test_command_line_overrides_and_config_errors(tmp_path, capsys):
    args = parsed(["--config", "demo:/data", "--workdir", str(tmp_path), "--config.train.epochs=3",
                   "--config.model.attention=scse"])
    config = args.config
    assert (config.train.epochs, config.model.attention, config.data.root) == (3, "scse", "/data")
    with pytest.raises(SystemExit) as stopped:
        parsed(["--config", "demo", "--workdir", str(tmp_path), "--config.train.epoch=3"])
    assert stopped.value.code == 2
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parsed(["--config", "demo", "--workdir", str(tmp_path), "--bogus"])


def test_each_log_step_records_how_long_the_device_waited_for_input(tiny_model, synthetic_root, tmp_path, monkeypatch):
    load = pipeline._LoadElement.map
    monkeypatch.setattr(pipeline._LoadElement, "map", lambda self, item: time.sleep(0.1) or load(self, item))
    postfixes = []

    class Bar(train.tqdm):
        def set_postfix(self, **values):
            postfixes.append(values)
            return super().set_postfix(**values)

    monkeypatch.setattr(train, "tqdm", Bar)
    config = small_config(synthetic_root, epochs=1, batch_size=2, eval_at_start=False)  # 8 steps
    config.data.workers = 0  # loads in this process, where the slowed map applies
    train.train_and_evaluate(config, tmp_path)
    logged = [record for record in read_history(tmp_path / "metrics.jsonl") if "train/loss" in record]
    assert [record["step"] for record in logged] == [2, 4, 6, 8]
    events = read_events(tmp_path / "tensorboard")
    for tag in ("train/data_wait_fraction", "train/input_images_per_s"):
        assert [event.step for event in events.Scalars(tag)] == [2, 4, 6, 8]
        assert [event.value for event in events.Scalars(tag)] == pytest.approx([record[tag] for record in logged])
    # While the step compiles, the pipeline's buffers fill (batches loading, being transferred and prefetched on
    # the device): they feed steps 1 to 5 (measured: waits 0.02, 0.03, then 0.92, 0.90). Then each batch of 2
    # takes 0.2 s to load against milliseconds of the tiny model's step and the log step's fetch.
    assert all(record["train/data_wait_fraction"] > 0.7 for record in logged[2:])
    assert logged[-1]["train/input_images_per_s"] < 2 / 0.2  # the source's rate at most
    assert len(postfixes) == 4 and all(postfix["data_wait"].endswith("%") for postfix in postfixes)
