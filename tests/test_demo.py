"""`siim-jax demo` end to end at a tiny size: every output it promises lands in the workdir, and a second run
reuses the dataset and the finished training."""

import json

import numpy as np
import pandas as pd

from siim_jax import cli
from siim_jax.data import labels, rle

# Enough training to learn something (12 steps at 64², one evaluation at the end): it reaches Dice 0.79 on the 12
# validation images, where predicting every image empty scores 0.75.
TINY = [
    "--n-train", "60", "--n-test", "3",
    "--config.data.image_size=64", "--config.train.batch_size=8", "--config.train.epochs=6",
    "--config.train.eval_every_epochs=6", "--config.train.eval_at_start=False", "--config.optim.warmup_steps=2",
]


def empty_prediction_dice(label_csv, image_ids) -> float:
    """The challenge Dice of predicting every image empty: 1 on an image without pneumothorax, 0 on the others."""
    rows = labels.read_labels(label_csv)
    positive = set(rows.loc[rows["EncodedPixels"] != rle.EMPTY, "ImageId"])
    return float(np.mean([image_id not in positive for image_id in image_ids]))


def test_demo_writes_every_output_and_reruns(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert cli.main(["demo", "--workdir", str(workdir), *TINY]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert {"dice", "dice_positive", "auc", "wall_s"} <= set(summary)
    assert 0.0 <= summary["dice"] <= 1.0
    validation_ids = pd.read_csv(summary["outputs"]["val_per_image"])["ImageId"]
    assert len(validation_ids) == summary["n_val_images"]
    assert summary["dice"] > empty_prediction_dice(workdir / "data" / "train-rle.csv", validation_ids)  # it learned
    submission = pd.read_csv(summary["outputs"]["submission"])
    expected = labels.read_image_ids(workdir / "data" / "sample_submission.csv")
    assert list(submission["ImageId"]) == expected
    for name in ("curves", "postprocess", "val_per_image", "submission"):
        assert (workdir / summary["outputs"][name]).exists(), name
    assert any((workdir / "overlays" / "test").glob("*.png"))
    capsys.readouterr()

    assert cli.main(["demo", "--workdir", str(workdir), *TINY]) == 0
    assert "reusing the synthetic dataset" in capsys.readouterr().out
