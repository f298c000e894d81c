import argparse
import subprocess
import sys

import numpy as np
import pytest

from siim_jax.commands import prepare
from siim_jax.data import pipeline, tfds_siim
from siim_jax.data.decode import decode_example
from siim_jax.data.labels import build_index

from .helpers import (
    IMAGE_SIZE,
    N_TEST,
    N_TRAIN,
    corrupt_copy,
    data_config,
)


@pytest.fixture(scope="module")
def corrupt_tree(synthetic_tree, tmp_path_factory):
    return corrupt_copy(synthetic_tree, tmp_path_factory.mktemp("corrupt") / "tree")


@pytest.fixture(scope="module")
def prepared(corrupt_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    args = parser.parse_args([str(corrupt_tree[0]), "--size", str(IMAGE_SIZE), "--out", str(out)])
    assert prepare.run(args) == 0
    return out


def test_corrupt_dicom_is_skipped_and_reported(corrupt_tree, prepared, capsys):
    builder = tfds_siim.load_prepared(prepared, IMAGE_SIZE)
    _, broken_id = corrupt_tree
    skipped = builder.info.metadata["skipped"]
    assert [item["image_id"] for item in skipped] == [broken_id]
    assert "no pixel data" in skipped[0]["reason"]
    assert builder.info.splits["train"].num_examples == N_TRAIN - 1
    assert builder.info.splits["test"].num_examples == N_TEST
    assert "1 files skipped" in tfds_siim.report(builder)
    frame = tfds_siim.index_frame(builder, "train")
    assert frame.loc[frame["image_id"] == broken_id, "record"].item() == -1


def test_prepared_records_equal_direct_decode_and_resize(corrupt_tree, prepared):
    root, broken_id = corrupt_tree
    builder = tfds_siim.load_prepared(prepared, IMAGE_SIZE)
    records = builder.as_data_source(split="train")
    index = build_index(root / "dicom-images-train", root / "train-rle.csv").frame
    readable = index[index["image_id"] != broken_id]
    assert len(records) == len(readable)
    for record, row in zip(records, readable.itertuples()):
        direct = decode_example(row.path, row.rles, IMAGE_SIZE)
        assert record["image_id"].decode() == row.image_id and bool(record["positive"]) == row.positive
        np.testing.assert_array_equal(record["image"], direct.image)
        np.testing.assert_array_equal(record["mask"], direct.mask)
        np.testing.assert_array_equal(record["original_size"], direct.original_size)


def test_pipeline_reads_the_same_folds_and_batches_prepared_or_on_the_fly(corrupt_tree, prepared):
    root, broken_id = corrupt_tree
    on_the_fly = pipeline.build_datasets(data_config(root))
    cache_config = data_config("", prepared_dir=str(prepared))
    from_cache = pipeline.build_datasets(cache_config)
    for direct, cached in [(on_the_fly.train, from_cache.train), (on_the_fly.val, from_cache.val)]:
        direct = direct[direct["image_id"] != broken_id].reset_index(drop=True)
        assert list(direct["image_id"]) == list(cached["image_id"])
        assert list(direct["fold"]) == list(cached["fold"])
    val = on_the_fly.val[on_the_fly.val["image_id"] != broken_id].reset_index(drop=True)
    direct = next(pipeline.eval_batches(data_config(root), val, len(val), 0, 1))
    cached = next(pipeline.eval_batches(cache_config, from_cache.val, len(val), 0, 1))
    for key in direct:
        np.testing.assert_array_equal(direct[key], cached[key], err_msg=key)
    assert list(from_cache.test["height"]) == [1024] * N_TEST


def test_on_the_fly_training_does_not_import_tfds():
    # TFDS loads only for a prepared cache (pipeline imports tfds_siim inside its prepared-cache branches).
    code = "import sys, siim_jax.training.loop; sys.exit('tensorflow_datasets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0
