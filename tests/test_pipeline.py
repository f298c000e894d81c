import grain
import jax
import ml_collections
import numpy as np
import pytest
from siim_jax.configs import defaults

from siim_jax.data import pipeline

from .helpers import (
    IMAGE_SIZE,
    N_TEST,
    corrupt_copy,
    data_config,
)


def balance(**values) -> ml_collections.ConfigDict:
    config = defaults.default_data_config().balance
    config.update(values)
    return config


POSITIVE = np.repeat([True, False], [50, 400])[np.random.default_rng(0).permutation(450)]


def test_difference_mode_keeps_every_positive_and_bounds_the_negatives():
    rows = pipeline.epoch_sample(POSITIVE, 0, balance(mode="difference", max_difference=100), seed=1)
    assert len(set(rows)) == len(rows) == 50 + 150
    assert POSITIVE[rows].sum() == 50


def test_fraction_schedule_sets_each_epochs_positive_fraction():
    schedule = balance(mode="fraction", positive_fraction=((0, 0.8), (10, 0.6), (20, 0.4)))
    for epoch, fraction in [(0, 0.8), (9, 0.8), (10, 0.6), (25, 0.4)]:
        rows = pipeline.epoch_sample(POSITIVE, epoch, schedule, seed=1)
        assert POSITIVE[rows].sum() == 50
        assert POSITIVE[rows].mean() == pytest.approx(fraction, abs=0.01)
    assert len(pipeline.epoch_sample(POSITIVE, 0, balance(mode="fraction", positive_fraction=((0, 0.05),)), 1)) == 450
    assert pipeline.positive_fraction_at(0.3, 7) == 0.3
    assert len(pipeline.epoch_sample(POSITIVE, 0, balance(mode="none"), 1)) == 450


def test_draws_repeat_per_seed_and_epoch_and_change_across_epochs():
    config = balance(mode="difference", max_difference=0)
    first = pipeline.epoch_sample(POSITIVE, 3, config, seed=5)
    np.testing.assert_array_equal(first, pipeline.epoch_sample(POSITIVE, 3, config, seed=5))
    negatives = [set(rows[~POSITIVE[rows]]) for rows in (first, pipeline.epoch_sample(POSITIVE, 4, config, 5))]
    assert negatives[0] != negatives[1]
    assert set(pipeline.epoch_sample(POSITIVE, 3, config, seed=6)[~POSITIVE[first]]) != negatives[0]


@pytest.fixture(scope="module")
def splits(synthetic_tree):
    return pipeline.build_datasets(data_config(synthetic_tree))


def test_splits_hold_every_image_once_with_the_test_sizes(splits):
    assert len(splits.train) + len(splits.val) == 12 and len(splits.test) == N_TEST
    assert (splits.val["fold"] == 0).all() and (splits.train["fold"] != 0).all()
    assert (splits.test["height"] == 1024).all() and (splits.test["width"] == 1024).all()


def take(iterator) -> list[dict[str, np.ndarray]]:
    """Copies of all remaining batches (out of shared memory), then closes the iterator."""
    batches = [{key: np.array(value) for key, value in batch.items()} for batch in iterator]
    iterator.close()
    return batches


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_batches_follow_the_epoch_draw(synthetic_tree, splits):
    config = data_config(synthetic_tree)
    batches = take(pipeline.train_iterator(config, splits.train, [2], 3, 0, 1))
    rows = pipeline.epoch_sample(splits.train["positive"].to_numpy(bool), 2, config.balance, config.seed)
    assert len(batches) == pipeline.steps_per_epoch(config, splits.train, 2, 3) == len(rows) // 3
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), rows[: len(batches) * 3])
    batch = batches[0]
    assert batch["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == np.uint8
    assert batch["mask"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and batch["mask"].dtype == np.uint8
    assert set(np.unique(batch["mask"])) <= {0, 1}
    assert batch["valid"].all() and batch["positive"].dtype == np.float32
    np.testing.assert_array_equal(batch["positive"], splits.train["positive"].to_numpy()[batch["index"]])
    assert_same_batches(batches, take(pipeline.train_iterator(config, splits.train, [2], 3, 0, 1)))


def test_processes_read_their_own_share_of_each_global_batch(synthetic_tree, splits):
    config = data_config(synthetic_tree)
    whole = take(pipeline.train_iterator(config, splits.train, [0], 4, 0, 1))
    shares = [take(pipeline.train_iterator(config, splits.train, [0], 4, index, 2)) for index in range(2)]
    joined = [{key: np.concatenate([a[key], b[key]]) for key in a} for a, b in zip(*shares)]
    assert_same_batches(whole, joined)


def test_workers_give_the_single_process_batches(synthetic_tree, splits):
    single = take(pipeline.train_iterator(data_config(synthetic_tree), splits.train, [1], 2, 0, 1))
    config = data_config(synthetic_tree, workers=2, prefetch=1)
    assert_same_batches(single, take(pipeline.train_iterator(config, splits.train, [1], 2, 0, 1)))


def data_mesh_sharding() -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",)), jax.sharding.PartitionSpec("data"))


@pytest.mark.parametrize("on_device", [False, True])
def test_restored_iterator_state_continues_with_the_next_batches(synthetic_tree, splits, tmp_path, on_device):
    config = data_config(synthetic_tree, prefetch=2)
    sharding = data_mesh_sharding() if on_device else None
    iterator = pipeline.train_iterator(config, splits.train, [0], 2, 0, 1, sharding=sharding)
    next(iterator), next(iterator)
    grain.checkpoint.CheckpointHandler().save(tmp_path, item=iterator)
    expected = take(iterator)
    restored = pipeline.train_iterator(config, splits.train, [0], 2, 0, 1, sharding=sharding)
    grain.checkpoint.CheckpointHandler().restore(tmp_path, item=restored)
    assert len(expected) >= 2
    assert_same_batches(expected, take(restored))


@pytest.mark.parametrize("saved_workers, resumed_workers", [(2, 0), (0, 3)])
def test_a_position_saved_under_one_worker_count_resumes_under_another(
    synthetic_tree, splits, tmp_path, saved_workers, resumed_workers
):
    # workers='auto' counts the cores: a run resumed on another machine loads with another number of workers
    config = data_config(synthetic_tree, workers=saved_workers, prefetch=1)
    iterator = pipeline.train_iterator(config, splits.train, range(2), 2, 0, 1)
    for _ in range(3):
        next(iterator)
    grain.checkpoint.CheckpointHandler().save(tmp_path, item=iterator)
    expected = take(iterator)
    config = data_config(synthetic_tree, workers=resumed_workers, prefetch=1)
    restored = pipeline.train_iterator(config, splits.train, range(2), 2, 0, 1)
    grain.checkpoint.CheckpointHandler().restore(tmp_path, item=restored)
    assert len(expected) >= 2
    assert_same_batches(expected, take(restored))
    assert_same_batches(expected, take(pipeline.train_iterator(config, splits.train, range(2), 2, 0, 1, start_batch=3)))


def test_a_position_that_is_not_one_of_the_runs_batches_is_refused(synthetic_tree, splits):
    iterator = pipeline.train_iterator(data_config(synthetic_tree), splits.train, [0], 2, 0, 1)
    with pytest.raises(ValueError, match="beyond this run's"):
        iterator.set_state({"next_batch": 10_000})
    with pytest.raises(ValueError, match="not a position in the training batches"):
        iterator.set_state({"next_index": 3})  # what grain's own iterators save
    iterator.close()


def test_a_run_iterator_continues_across_epochs_and_restores_into_the_next_epoch(synthetic_tree, splits, tmp_path):
    config = data_config(synthetic_tree)
    epochs = [take(pipeline.train_iterator(config, splits.train, [epoch], 3, 0, 1)) for epoch in range(3)]
    run = pipeline.train_iterator(config, splits.train, range(3), 3, 0, 1)
    for _ in range(len(epochs[0]) + 1):  # one batch into epoch 1
        next(run)
    grain.checkpoint.CheckpointHandler().save(tmp_path, item=run)
    restored = pipeline.train_iterator(config, splits.train, range(3), 3, 0, 1)
    grain.checkpoint.CheckpointHandler().restore(tmp_path, item=restored)
    assert_same_batches(epochs[1][1:] + epochs[2], take(restored))
    assert_same_batches([batch for epoch in epochs for batch in epoch], take(pipeline.train_iterator(
        config, splits.train, range(3), 3, 0, 1)))
    run.close()


def test_eval_batches_cover_every_row_once_and_mark_padding(synthetic_tree, splits):
    config = data_config(synthetic_tree)
    shares = [take(pipeline.eval_batches(config, splits.val, 3, index, 3)) for index in range(3)]
    rows = np.concatenate([batch["index"] for batches in zip(*shares) for batch in batches])
    valid = np.concatenate([batch["valid"] for batches in zip(*shares) for batch in batches])
    np.testing.assert_array_equal(rows[valid], np.arange(len(splits.val)))
    assert (rows[~valid] == -1).all() and len(rows) % 3 == 0
    test = take(pipeline.test_batches(config, splits.test, 2, 0, 1))
    assert sorted(test[0]) == ["image", "index", "original_size", "valid"]
    assert np.concatenate([b["valid"] for b in test]).sum() == N_TEST
    sizes = np.concatenate([b["original_size"][b["valid"]] for b in test])
    np.testing.assert_array_equal(sizes, splits.test[["height", "width"]].to_numpy())  # as the DICOM headers say


def test_undecodable_dicom_becomes_an_invalid_blank_row(synthetic_tree, tmp_path):
    root, image_id = corrupt_copy(synthetic_tree, tmp_path / "tree")
    config = data_config(root, n_folds=1, fold=-1)
    frame = pipeline.build_datasets(config).train
    batch = take(pipeline.eval_batches(config, frame, len(frame), 0, 1))[0]
    broken = int(np.flatnonzero(frame["image_id"] == image_id)[0])
    assert not batch["valid"][broken] and batch["valid"].sum() == len(frame) - 1
    assert (batch["mask"][broken] == 0).all() and batch["positive"][broken] == 0


def test_training_stands_in_the_next_decodable_image_of_the_same_class(synthetic_tree, tmp_path):
    root, image_id = corrupt_copy(synthetic_tree, tmp_path / "tree")
    config = data_config(root, n_folds=1, fold=-1)
    config.balance.mode = "none"  # every row once
    frame = pipeline.build_datasets(config).train
    broken = int(np.flatnonzero(frame["image_id"] == image_id)[0])
    positive = frame["positive"].to_numpy(bool)
    same_class = [row for row in range(len(frame)) if positive[row] == positive[broken] and row != broken]
    stand_in = next((row for row in same_class if row > broken), same_class[0])

    (batch,) = take(pipeline.train_iterator(config, frame, [0], len(frame), 0, 1))
    assert batch["valid"].all()
    counts = np.bincount(batch["index"], minlength=len(frame))
    assert counts[broken] == 0 and counts[stand_in] == 2
    assert (np.delete(counts, [broken, stand_in]) == 1).all()
    assert (batch["positive"][batch["index"] == stand_in] == positive[stand_in]).all()


def test_to_device_places_the_batch_on_the_data_mesh(synthetic_tree, splits):
    sharding = data_mesh_sharding()
    iterator = pipeline.eval_batches(data_config(synthetic_tree), splits.val, 2, 0, 1, sharding=sharding)
    batch = next(iterator)
    iterator.close()
    assert isinstance(batch["image"], jax.Array) and batch["image"].sharding == sharding
    assert batch["image"].shape == (2, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == np.uint8


def test_host_hands_the_device_two_bytes_a_pixel(synthetic_tree, splits):
    """uint8 image and mask, plus a few bytes of labels: at most 2·S² + 1 KiB a training image."""
    batch = take(pipeline.train_iterator(data_config(synthetic_tree), splits.train, [0], 3, 0, 1))[0]
    bytes_per_image = sum(value.nbytes for value in batch.values()) / len(batch["image"])
    assert bytes_per_image <= 2 * IMAGE_SIZE**2 + 1024


def test_auto_workers_leave_a_core_to_the_main_process(monkeypatch):
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(2)))
    assert pipeline.worker_count("auto") == 1
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0})
    assert pipeline.worker_count("auto") == 0
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert pipeline.worker_count("auto") == pipeline.MAX_AUTO_WORKERS
    assert pipeline.worker_count(3) == 3
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(ValueError, match="workers must be"):
            pipeline.worker_count(bad)
