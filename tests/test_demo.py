"""`siim-jax demo` end to end at a tiny size: every output it promises lands in the workdir, and a second run
reuses the dataset and the finished training."""

import json

import pandas as pd

from siim_jax import cli
from siim_jax.data import labels

TINY = [
    "--n-train", "60", "--n-test", "3",
    "--config.train.batch_size=8", "--config.train.epochs=1", "--config.train.eval_at_start=False",
]


def test_demo_writes_every_output_and_reruns(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert cli.main(["demo", "--workdir", str(workdir), *TINY]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert {"dice", "dice_positive", "auc", "wall_s"} <= set(summary)
    assert 0.0 <= summary["dice"] <= 1.0
    submission = pd.read_csv(summary["outputs"]["submission"])
    expected = labels.read_image_ids(workdir / "data" / "sample_submission.csv")
    assert list(submission["ImageId"]) == expected
    for name in ("curves", "postprocess", "val_per_image", "submission"):
        assert (workdir / summary["outputs"][name]).exists(), name
    assert any((workdir / "overlays" / "test").glob("*.png"))
    capsys.readouterr()

    assert cli.main(["demo", "--workdir", str(workdir), *TINY]) == 0
    assert "reusing the synthetic dataset" in capsys.readouterr().out
