"""Crash safety: training killed (SIGKILL) mid-step and mid-save or stopped by SIGTERM, then resumed to the
uninterrupted result; a cross-validation fold killed mid-run, then resumed; submissions interrupted at any point.

Each training run is a child of a multiprocessing forkserver that imported the training code once, and the runs share
a persistent compilation cache, so a run costs seconds. The model is `tests.tiny_model`'s tiny one; the data
10 synthetic images at 32², 8 in training: 4 steps an epoch for 2 epochs, a checkpoint every 2 steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
import pytest
from flax import nnx

from siim_jax.config_utils import load_config
from siim_jax.data.layout import TRAIN_CSV, TRAIN_DIR
from siim_jax.evaluation import cv
from siim_jax.evaluation.evaluate import labelled_frame
from siim_jax.inference.predictor import Inference, Predictor
from siim_jax.inference.submission import predict_submission
from siim_jax.models import SegOutput
from siim_jax.training.checkpoints import CHECKPOINT_DIR
from siim_jax.training.logging import read_history
from tests import dicom_factory as factory
from tests import kill_worker
from tests.kill_worker import forkserver, run_child  # noqa: F401 - forkserver is a fixture

DEMO_CONFIG = "demo"
TOTAL_STEPS = 8
RUN_TIMEOUT_S = 180
SETTINGS = [
    "--config.data.image_size=32",
    "--config.data.n_folds=5",
    "--config.data.balance.mode=none",
    "--config.train.batch_size=2",
    "--config.train.eval_batch_size=2",
    "--config.train.epochs=2",
    "--config.train.checkpoint_every_steps=2",
    "--config.train.log_every_steps=1",
    "--config.train.eval_at_start=False",
    "--config.optim.warmup_steps=1",
]


@pytest.fixture(scope="module")
def data(synthetic_trees):
    return synthetic_trees(10, seed=5, positive_fraction=0.5)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compilation_cache")


def train(forkserver, compilation_cache, data, workdir, at: str | None = None) -> int:
    """Runs (or resumes) the training in `workdir` in a child process; returns its exit code (-9: SIGKILL)."""
    workdir.mkdir(exist_ok=True)
    argv = ["--compilation-cache", str(compilation_cache), *(["--at", at] if at else [])]
    argv += ["--config", f"{DEMO_CONFIG}:{data}", "--workdir", str(workdir), *SETTINGS]
    return run_child(forkserver, kill_worker.run_logged, (argv, workdir / "train.log"), RUN_TIMEOUT_S)


def _manager(workdir) -> ocp.CheckpointManager:
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(read_only=True)
    return ocp.CheckpointManager(workdir / CHECKPOINT_DIR, options=options, item_handlers=handlers)


def read_checkpoint(workdir, step: int) -> dict:
    """Every part of the checkpoint of `step`: the state as saved, the config, and the data iterator's position."""
    with _manager(workdir) as manager:
        parts = ocp.args.Composite(state=ocp.args.PyTreeRestore(), config=ocp.args.JsonRestore())
        restored = manager.restore(step, args=parts)
    positions = sorted((workdir / CHECKPOINT_DIR / str(step) / "data_iter").glob("process_*.json"))
    assert positions, f"checkpoint {step} has no data iterator position"
    data_iter = [json.loads(position.read_text()) for position in positions]
    return {"state": restored.state, "config": restored.config, "data_iter": data_iter}


def saved_steps(workdir) -> list[int]:
    with _manager(workdir) as manager:
        return sorted(manager.all_steps())


def check_interruption(workdir, point: str, exit_code: int) -> dict:
    """Checks what a run signalled at `point` left behind; returns what was observed."""
    record = json.loads((workdir / kill_worker.SIGNALLED_FILE).read_text())
    (workdir / kill_worker.SIGNALLED_FILE).unlink()
    steps = saved_steps(workdir)
    for step in steps:
        read_checkpoint(workdir, step)  # no checkpoint is ever unreadable
    latest = steps[-1] if steps else 0
    if record["signal"] == "SIGTERM":
        assert exit_code == 0
        assert latest == record["step"], "SIGTERM saves the step it stopped at"
        steps_done = record["step"]
    else:
        assert exit_code == -9
        # A step that was running is lost; a save that was being written may be too, never a completed one.
        steps_done = record["step"] - point.startswith("kill-mid-step")
        assert max(record["completed"], default=0) <= latest <= steps_done
    return {"point": point, **record, "saved": steps, "resumes_from": latest, "steps_lost": steps_done - latest}


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_killed_runs_resume_to_the_uninterrupted_result(forkserver, compilation_cache, data, tmp_path):
    run = functools.partial(train, forkserver, compilation_cache, data)
    reference = tmp_path / "uninterrupted"
    assert run(reference) == 0
    assert saved_steps(reference)[-1] == TOTAL_STEPS

    interrupted = tmp_path / "interrupted"
    observed = []
    for point in ("kill-mid-step:5", "kill-after-save:6", "term-mid-step:7"):
        exit_code = run(interrupted, at=point)
        observed.append(check_interruption(interrupted, point, exit_code))
    assert run(interrupted) == 0
    print("\n".join(json.dumps(item) for item in observed))

    final, expected = read_checkpoint(interrupted, TOTAL_STEPS), read_checkpoint(reference, TOTAL_STEPS)
    assert final["data_iter"] == expected["data_iter"]
    final_leaves = jax.tree_util.tree_leaves_with_path(final["state"])
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected["state"])
    assert [path for path, _ in final_leaves] == [path for path, _ in expected_leaves]
    for (path, value), (_, wanted) in zip(final_leaves, expected_leaves):
        np.testing.assert_array_equal(value, wanted, err_msg=jax.tree_util.keystr(path))


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_cv_resumes_a_killed_fold_writes_its_oof_file_and_skips_the_finished_fold(
    forkserver, compilation_cache, data, tmp_path
):
    workdir = tmp_path / "cv"

    def run_cv(folds: str, at: str | None = None) -> int:
        argv = ["--compilation-cache", str(compilation_cache), *(["--at", at] if at else []), "cv",
                "--config", f"{DEMO_CONFIG}:{data}", "--workdir", str(workdir), "--folds", folds, *SETTINGS]
        return run_child(forkserver, kill_worker.run_logged, (argv, tmp_path / "cv.log"), RUN_TIMEOUT_S)

    assert run_cv("0") == 0
    first, second = cv.fold_dir(workdir, 0), cv.fold_dir(workdir, 1)
    done = {name: (first / name).stat().st_mtime_ns for name in (cv.FINISHED_FILE, cv.OOF_FILE, "metrics.jsonl")}
    assert run_cv("0,1", at="kill-mid-step:6") == -9  # fold 0 skipped; fold 1 killed while step 6 runs
    assert not (second / cv.FINISHED_FILE).exists() and not (second / cv.OOF_FILE).exists()
    resumes_from = saved_steps(second)[-1]  # orbax finishes one save before it starts the next: step 2 at least
    assert 2 <= resumes_from < 6

    assert run_cv("0,1") == 0
    assert {name: (first / name).stat().st_mtime_ns for name in done} == done  # the finished fold was not touched
    assert (second / cv.FINISHED_FILE).is_file() and saved_steps(second)[-1] == TOTAL_STEPS
    logged = [record["step"] for record in read_history(second / "metrics.jsonl") if "train/loss" in record]
    assert logged == [*range(1, 6), *range(resumes_from + 1, TOTAL_STEPS + 1)]  # resumed, not started again
    config = load_config(f"{DEMO_CONFIG}:{data}", SETTINGS)
    validation = labelled_frame(data / TRAIN_DIR, data / TRAIN_CSV, 1, config.data)
    assert cv.load_oof(second / cv.OOF_FILE).image_ids == list(validation["image_id"])
    summary = pd.read_csv(workdir / cv.SUMMARY_CSV, index_col=0)
    assert list(summary.index) == ["fold 0", "fold 1", "pooled"]


# ---------------------------------------------------------------------------------------------------- submissions

N_ROWS = 20_000  # about 800 kB: written in many buffer flushes, so a kill can leave a partial temporary file
PREVIOUS = "ImageId,EncodedPixels\n1.2.3,-1\n"


@pytest.mark.parametrize("killed_at", [0, N_ROWS // 2, N_ROWS - 1])
@pytest.mark.parametrize("had_previous", [True, False], ids=["previous-file", "no-file"])
def test_submission_killed_while_written_leaves_no_file_or_the_previous_one(
    forkserver, tmp_path, killed_at, had_previous
):
    out = tmp_path / "submission.csv"
    if had_previous:
        out.write_text(PREVIOUS)
    assert run_child(forkserver, kill_worker.write_submission_killed_at, (out, N_ROWS, killed_at), 60) == -9
    if had_previous:
        assert out.read_text() == PREVIOUS
    else:
        assert not out.exists()
    visible = [path.name for path in tmp_path.iterdir() if not path.name.startswith(".")]  # a killed .tmp may stay
    assert visible == ([out.name] if had_previous else [])


class _EmptyMasks(nnx.Module):
    """Mask logits of -10 everywhere and a class logit of 0: every predicted mask is empty."""

    def __call__(self, images, *, train):
        return SegOutput(jnp.full((*images.shape[:3], 1), -10.0), jnp.zeros((images.shape[0], 1)))


@dataclasses.dataclass
class _InterruptedInference(Inference):
    """The real inference, stopped by KeyboardInterrupt (Ctrl-C) before prediction `interrupted_at`."""

    interrupted_at: int | None = None

    def predictions(self, items, desc: str = "predict"):
        for index, prediction in enumerate(super().predictions(items, desc)):
            if index == self.interrupted_at:
                raise KeyboardInterrupt
            yield prediction


@pytest.fixture(scope="module")
def test_images(tmp_path_factory) -> list[tuple[str, str]]:
    folder = tmp_path_factory.mktemp("test_images")
    return [
        (
            image_id,
            factory.save(factory.dataset(factory.ramp(), SOPInstanceUID=image_id), folder / f"{image_id}.dcm"),
        )
        for image_id in ("1.2.4", "1.2.5", "1.2.6")
    ]


@pytest.mark.parametrize("interrupted_at", [0, 1, 2, None])
def test_predict_interrupted_at_any_image_leaves_the_previous_file(tmp_path, test_images, interrupted_at):
    out = tmp_path / "submission.csv"
    out.write_text(PREVIOUS)
    inference = _InterruptedInference(Predictor(_EmptyMasks(), batch_size=2), image_size=16, progress=False,
                                      interrupted_at=interrupted_at)
    if interrupted_at is None:
        predict_submission(inference, test_images, out)
        assert out.read_text() == "ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i, _ in test_images)
    else:
        with pytest.raises(KeyboardInterrupt):
            predict_submission(inference, test_images, out)
        assert out.read_text() == PREVIOUS
    assert [path.name for path in tmp_path.iterdir()] == [out.name]
