import argparse
import os
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from siim_jax.data import rle
from siim_jax.data.augment import normalise, resize_pair
from siim_jax.data.dicom import DicomError
from siim_jax.inference.overlays import OverlayWriter
from siim_jax.inference.postprocess import PostProcess
from siim_jax.inference.predictor import Inference, Predictor, UnreadableImageWarning, predict_probabilities
from siim_jax.inference.submission import SubmissionError, predict_submission, submission_items, write_submission
from siim_jax.models import SegOutput

from . import dicom_factory as factory
from .helpers import Brightness, read_png

MODEL_SIZE = 32
DEMO_CONFIG = "demo"


def preprocess(pixels):
    """The validation preprocessing of the input pipeline: bilinear resize, ImageNet normalisation."""
    return normalise(resize_pair(pixels, None, MODEL_SIZE)[0])


class TinyConvNet(nnx.Module):
    """A random 3x3 conv and a class logit: not mirror-symmetric, so hflip TTA changes its output."""

    def __init__(self):
        self.conv = nnx.Conv(3, 1, (3, 3), rngs=nnx.Rngs(0))
        self.norm = nnx.BatchNorm(1, rngs=nnx.Rngs(0))

    def __call__(self, x, *, train):
        logits = self.norm(self.conv(x), use_running_average=not train)
        return SegOutput(logits, logits[:, :, : x.shape[2] // 2].mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def conv_net():
    return TinyConvNet()


def test_hflip_tta_averages_prediction_and_mirrored_prediction(conv_net):
    images = jax.random.normal(jax.random.key(0), (2, MODEL_SIZE, MODEL_SIZE, 3))
    probs, class_probs = predict_probabilities(conv_net, images, tta_hflip=True)
    plain_logits, plain_class = conv_net(images, train=False)
    mirrored_logits, mirrored_class = conv_net(images[:, :, ::-1], train=False)
    expected = (jax.nn.sigmoid(plain_logits[..., 0]) + jax.nn.sigmoid(mirrored_logits[:, :, ::-1, 0])) / 2
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_allclose(class_probs, (jax.nn.sigmoid(plain_class) + jax.nn.sigmoid(mirrored_class))[:, 0] / 2,
                               atol=1e-6)
    no_tta, _ = predict_probabilities(conv_net, images, tta_hflip=False)
    np.testing.assert_allclose(no_tta, jax.nn.sigmoid(plain_logits[..., 0]), atol=1e-6)


def test_predictor_pads_a_short_batch_and_matches_eager_inference(conv_net):
    images = np.asarray(jax.random.normal(jax.random.key(1), (3, MODEL_SIZE, MODEL_SIZE, 3)))
    predictor = Predictor(conv_net, batch_size=4)
    assert predictor.batch_size % jax.device_count() == 0
    probs, class_probs = predictor(images)
    expected, expected_class = predict_probabilities(conv_net, jnp.asarray(images))
    assert probs.shape == (3, MODEL_SIZE, MODEL_SIZE) and class_probs.shape == (3,)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(class_probs, expected_class, atol=1e-5)
    with pytest.raises(ValueError, match="batch holds"):
        predictor(np.zeros((5, MODEL_SIZE, MODEL_SIZE, 3), np.float32))


SHARDED_SCRIPT = """
import jax, numpy as np
from flax import nnx
from siim_jax.models import SegOutput
from siim_jax.inference.predictor import Predictor, predict_probabilities
assert jax.device_count() == 2
class Conv(nnx.Module):
    def __init__(self):
        self.conv = nnx.Conv(3, 1, (3, 3), rngs=nnx.Rngs(0))
    def __call__(self, x, *, train):
        return SegOutput(self.conv(x), None)
model = Conv()
predictor = Predictor(model, batch_size=3)
images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
probs, _ = predictor(images)
expected, _ = predict_probabilities(model, images)
assert predictor.batch_size == 4, predictor.batch_size
np.testing.assert_allclose(probs, expected, atol=1e-6)
print("sharded ok")
"""


def test_predictor_shards_the_batch_over_every_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "sharded ok" in result.stdout, result.stderr[-2000:]


def _inference(batch_size=4, on_error="empty"):
    return Inference(Predictor(Brightness(), batch_size), MODEL_SIZE, on_error, progress=False)


def _test_set(folder, shapes):
    """DICOMs of random blobs (id -> pixels) in `folder`, of the given original sizes."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    pixels_by_id = {}
    for number, shape in enumerate(shapes):
        noise = cv2.GaussianBlur(rng.uniform(0, 255, shape).astype(np.float32), (0, 0), shape[0] / 12)
        pixels = cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        image_id = f"1.2.3.{number}"
        factory.save(factory.dataset(pixels, SOPInstanceUID=image_id), folder / f"{image_id}.dcm")
        pixels_by_id[image_id] = pixels
    return pixels_by_id


def _read_submission(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_submission_rle_decodes_back_to_the_predicted_masks(tmp_path):
    shapes = [(64, 64), (48, 80), (96, 64)]
    pixels_by_id = _test_set(tmp_path / "test", shapes)
    rule = PostProcess(threshold=0.6, min_component_area=3)
    out = tmp_path / "submission.csv"
    summary = predict_submission(
        _inference(batch_size=2), submission_items(tmp_path / "test"), out, rule
    )
    frame = _read_submission(out)
    assert list(frame.columns) == ["ImageId", "EncodedPixels"]
    assert list(frame["ImageId"]) == sorted(pixels_by_id)
    assert summary.n_images == 3 and summary.unreadable == ()
    for image_id, encoded in zip(frame["ImageId"], frame["EncodedPixels"]):
        pixels = pixels_by_id[image_id]
        probs, class_probs = predict_probabilities(Brightness(), jnp.asarray(preprocess(pixels))[None])
        full = cv2.resize(np.asarray(probs[0]), pixels.shape[::-1], interpolation=cv2.INTER_LINEAR)
        expected = rule.apply(full, float(class_probs[0]))
        assert expected.any() and not expected.all()
        np.testing.assert_array_equal(rle.decode(encoded, *pixels.shape), expected)


def test_progress_bar_counts_only_images_whose_results_reached_the_host(tmp_path, monkeypatch):
    from siim_jax.inference import predictor as predict

    fetched, shown = [0], []

    class CountingPredictor(Predictor):
        def fetch(self, dispatched):
            probs, class_probs = super().fetch(dispatched)
            fetched[0] += len(probs)
            return probs, class_probs

    class RecordingBar:
        def __init__(self, total, **options):
            self.n = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, count=1):
            self.n += count
            shown.append((self.n, fetched[0]))

    monkeypatch.setattr(predict, "tqdm", RecordingBar)
    _test_set(tmp_path / "test", [(64, 64)] * 5)
    inference = Inference(CountingPredictor(Brightness(), batch_size=2), MODEL_SIZE, progress=False)
    assert len(list(inference.predictions(submission_items(tmp_path / "test")))) == 5
    assert [count for count, _ in shown] == [1, 2, 3, 4, 5]
    assert all(count <= fetched_images for count, fetched_images in shown)


def test_unreadable_or_missing_dicom_gives_empty_row_and_warning(tmp_path):
    pixels = _test_set(tmp_path / "test", [(64, 64), (48, 80), (64, 64)])
    first, second, third = pixels
    (tmp_path / "test" / "broken.dcm").write_bytes(b"not a dicom at all")
    sample = tmp_path / "sample_submission.csv"
    ids = [first, "broken", second, "absent", third]  # a batch of 4 holds the broken file between two readable ones
    sample.write_text("ImageId,EncodedPixels\n" + "".join(f"{image_id},-1\n" for image_id in ids))
    out = tmp_path / "submission.csv"
    rule = PostProcess(threshold=0.55)
    with pytest.warns(UnreadableImageWarning) as caught:
        summary = predict_submission(
            _inference(batch_size=4), submission_items(tmp_path / "test", sample), out, rule, expected_ids=ids,
        )
    messages = " | ".join(str(warning.message) for warning in caught)
    assert "broken.dcm" in messages and "absent" in messages
    frame = _read_submission(out)
    assert list(frame["ImageId"]) == ids
    assert [encoded == "-1" for encoded in frame["EncodedPixels"]] == [False, True, False, True, False]
    assert summary.unreadable == ("broken", "absent")
    for image_id, encoded in zip(ids, frame["EncodedPixels"]):  # each mask is its own image's, not a neighbour's
        if image_id in pixels:
            height, width = pixels[image_id].shape
            probs, _ = Predictor(Brightness(), 1)(preprocess(pixels[image_id])[None])
            expected = rule.apply(cv2.resize(probs[0], (width, height), interpolation=cv2.INTER_LINEAR))
            assert expected.any() and not expected.all()
            np.testing.assert_array_equal(rle.decode(encoded, height, width), expected, err_msg=image_id)

    with pytest.raises(DicomError, match="broken.dcm"):
        predict_submission(
            _inference(on_error="fail"), submission_items(tmp_path / "test", sample), tmp_path / "strict.csv"
        )
    assert not (tmp_path / "strict.csv").exists()


def test_real_stage1_sample_submission_gives_one_row_per_unique_id(siim_real, tmp_path):
    sample = siim_real / "new_sample_submission.csv"  # 1,484 rows, 1,372 unique ids, some repeated
    (tmp_path / "empty").mkdir()
    items = submission_items(tmp_path / "empty", sample)
    with pytest.warns(UnreadableImageWarning):
        summary = predict_submission(_inference(), items, tmp_path / "submission.csv",
                                     expected_ids=[image_id for image_id, _ in items])
    frame = _read_submission(tmp_path / "submission.csv")
    expected = list(dict.fromkeys(pd.read_csv(sample)["ImageId"]))
    assert len(expected) == 1372 and list(frame["ImageId"]) == expected
    assert set(frame["EncodedPixels"]) == {"-1"} and len(summary.unreadable) == 1372


def test_incomplete_submission_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "submission.csv"
    out.write_text("previous\n")
    with pytest.raises(SubmissionError, match="1 missing"):
        write_submission(out, [("a", "-1")], expected_ids=["a", "b"])
    with pytest.raises(SubmissionError, match="several rows"):
        write_submission(out, [("a", "-1"), ("a", "1 2")])
    assert out.read_text() == "previous\n"
    assert [path.name for path in tmp_path.iterdir()] == ["submission.csv"]
    write_submission(out, [("b", "-1"), ("a", "3 4")], expected_ids=["a", "b"])
    assert out.read_text() == "ImageId,EncodedPixels\nb,-1\na,3 4\n"


def test_submission_is_synced_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    out = tmp_path / "submission.csv"
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        synced = os.fstat(descriptor).st_ino
        events.append("folder" if synced == tmp_path.stat().st_ino else f"file {os.fstat(descriptor).st_size} bytes")
        fsync(descriptor)

    def recording_replace(source, target):
        events.append("rename")
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write_submission(out, [("a", "-1"), ("b", "3 4")])
    assert events == [f"file {len(out.read_bytes())} bytes", "folder", "rename", "folder"]


def test_predict_writes_overlays_of_its_images(tmp_path):
    pixels_by_id = _test_set(tmp_path / "test", [(64, 64), (48, 80)])
    overlays = OverlayWriter(tmp_path / "overlays", size=64)
    predict_submission(
        _inference(batch_size=2), submission_items(tmp_path / "test"), tmp_path / "submission.csv",
        PostProcess(threshold=0.6), overlays=overlays,
    )
    assert sorted(path.name for path in overlays.written) == sorted(f"{image_id}.png" for image_id in pixels_by_id)
    picture = read_png(overlays.written[0])
    red = (picture[..., 0] == 255) & (picture[..., 1] == 0) & (picture[..., 2] == 0)
    assert red.any()


# ---------------------------------------------------------------------------------------------------- a trained run


def _small_model_dir(folder, dtype="float32"):
    """A randomly initialised demo-style UNet at MODEL_SIZE, saved as a model directory."""
    from siim_jax.config_utils import load_config
    from siim_jax.models import build_model
    from siim_jax.models import io as model_io

    model_config = load_config(DEMO_CONFIG).model
    model_config.update(decoder_channels=(16, 8, 8, 8, 8), dtype=dtype)
    model_io.save_model(folder, build_model(model_config), model_config)
    return folder


BFLOAT16_PROB_ERROR = 0.003


def test_bfloat16_inference_keeps_the_weights_and_stays_close_to_float32(tmp_path):
    _test_set(tmp_path / "test", [(64, 64)] * 3)
    items = submission_items(tmp_path / "test")
    model_dir = _small_model_dir(tmp_path / "model")
    runs = {
        dtype: Inference.from_checkpoint(model_dir, image_size=MODEL_SIZE, batch_size=4, dtype=dtype, progress=False)
        for dtype in ("float32", "bfloat16")
    }
    weights = [leaf for leaf in jax.tree.leaves(runs["bfloat16"].predictor._state) if jnp.issubdtype(leaf.dtype,
                                                                                                 jnp.floating)]
    assert weights and {leaf.dtype for leaf in weights} == {np.dtype(np.float32)}  # parameters and statistics
    probs = {dtype: np.stack([p.prob for p in run.predictions(items)]) for dtype, run in runs.items()}
    assert probs["float32"].dtype == probs["bfloat16"].dtype == np.float32
    assert not np.array_equal(probs["float32"], probs["bfloat16"])  # bfloat16 did compute
    # Measured: at most 0.0014 apart on these images (python -m pytest tests/test_predict.py -k bfloat16); the bound
    # is about twice that.
    np.testing.assert_allclose(probs["bfloat16"], probs["float32"], atol=BFLOAT16_PROB_ERROR)


CACHED_PREDICT = [sys.executable, "-m", "siim_jax.cli", "predict", "--image-size", str(MODEL_SIZE), "--workers", "0"]


def test_a_second_predict_loads_its_compiled_function_from_the_persistent_cache(tmp_path):
    _test_set(tmp_path / "test", [(64, 64)] * 2)
    model_dir = _small_model_dir(tmp_path / "model")
    env = {**os.environ, "JAX_LOG_COMPILES": "1", "JAX_PLATFORMS": "cpu"}
    argv = [*CACHED_PREDICT, "--checkpoint", model_dir, "--data", tmp_path / "test",
            "--compilation-cache", tmp_path / "cache"]
    logs = []
    for run in range(2):
        result = subprocess.run([str(arg) for arg in [*argv, "--out", tmp_path / f"{run}.csv"]], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        logs.append(result.stderr)
    hit = "Persistent compilation cache hit for 'jit__forward'"
    assert hit not in logs[0] and hit in logs[1]
    assert (tmp_path / "0.csv").read_bytes() == (tmp_path / "1.csv").read_bytes()


def _train_briefly(root):
    """A synthetic set (with test labels in stage_2_train.csv) and the demo config trained on it for two epochs, each
    evaluated (so that two checkpoints are ranked)."""
    from siim_jax.config_utils import load_config
    from siim_jax.data.synthetic import generate
    from siim_jax.training.loop import train_and_evaluate

    data = generate(root / "data", n_train=12, n_test=5, seed=1, positive_fraction=0.5, stage2=True, progress=False)
    config = load_config(f"{DEMO_CONFIG}:{data.out_dir}")
    config.data.image_size = 64
    config.model.decoder_channels = (16, 8, 8, 8, 8)
    config.train.update(epochs=2, eval_every_epochs=1, batch_size=2, eval_batch_size=2, eval_at_start=False)
    config.optim.warmup_steps = 1
    train_and_evaluate(config, root / "run")
    return root / "run", data


def _run_command(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(arg) for arg in argv]))


def test_briefly_trained_run_through_predict_tune_and_evaluate(tmp_path, capsys):
    # One test, so that the training happens once however pytest-xdist spreads the tests.
    run_dir, data = _train_briefly(tmp_path)
    _check_predict_command_covers_every_id_of_the_sample_submission(run_dir, data, tmp_path, capsys)
    _check_averaging_means_the_parameters_and_statistics_or_recomputes_them(run_dir)
    _check_tune_then_evaluate_commands(run_dir, data, tmp_path, capsys)
    _check_the_readme_tune_evaluate_predict_lines(run_dir, data, tmp_path, capsys)


def _check_predict_command_covers_every_id_of_the_sample_submission(run_dir, data, tmp_path, capsys):
    from siim_jax.commands import predict

    out = tmp_path / "submission.csv"
    argv = ["--checkpoint", run_dir, "--best", "--data", data.out_dir / "dicom-images-test", "--out", out,
            "--sample-submission", data.sample_submission_csv, "--overlays", tmp_path / "predict-overlays",
            "--overlay-count", 2]
    assert _run_command(predict, argv) == 0
    frame = _read_submission(out)
    assert list(frame["ImageId"]) == list(data.test_ids)
    for encoded in frame["EncodedPixels"]:
        rle.decode(encoded, 1024, 1024)
    assert len(list((tmp_path / "predict-overlays").iterdir())) == 2
    assert "images/s" in capsys.readouterr().out


def _check_averaging_means_the_parameters_and_statistics_or_recomputes_them(run_dir):
    from siim_jax.training.checkpoints import TrainingCheckpoints, checkpoint_directory, restore_for_inference

    with TrainingCheckpoints(checkpoint_directory(run_dir), read_only=True) as checkpoints:
        steps = checkpoints.best_steps(2)
    assert len(steps) == 2
    averaged, _ = restore_for_inference(run_dir, average_top=2)
    recomputed, _ = restore_for_inference(run_dir, average_top=2, bn_statistics="recompute")
    singles = [restore_for_inference(run_dir, step=step)[0] for step in steps]
    leaves = [jax.tree.leaves(nnx.state(model, nnx.Param)) for model in (averaged, recomputed, *singles)]
    assert not all(np.array_equal(a, b) for a, b in zip(leaves[2], leaves[3]))  # two different sets of weights
    for mean, mean_too, first, second in zip(*leaves):
        np.testing.assert_allclose(mean, (np.asarray(first) + np.asarray(second)) / 2, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(mean_too, mean)
    # BatchNorm statistics: averaged by default; recomputed for the averaged weights (tests/test_averaging.py) on
    # request, which gives others
    stats = [jax.tree.leaves(nnx.state(model, nnx.BatchStat)) for model in (averaged, recomputed, *singles)]
    assert not all(np.array_equal(a, b) for a, b in zip(stats[2], stats[3]))  # the steps' statistics differ
    for mean, _, first, second in zip(*stats):
        np.testing.assert_allclose(mean, (np.asarray(first) + np.asarray(second)) / 2, rtol=1e-6, atol=1e-7)
    assert not all(np.allclose(mean, again) for mean, again, _, _ in zip(*stats))


def _check_tune_then_evaluate_commands(run_dir, data, tmp_path, capsys):
    from siim_jax.commands import evaluate, tune

    tuned = tmp_path / "postprocess.json"
    assert _run_command(tune, ["--checkpoint", run_dir, "--out", tuned, "--top", 3]) == 0
    table = capsys.readouterr().out
    assert "rank" in table and "wrote the best setting" in table
    PostProcess.from_json(tuned)

    per_image = tmp_path / "per_image.csv"
    argv = ["--checkpoint", run_dir, "--data", data.out_dir / "dicom-images-test", "--labels", data.stage2_csv,
            "--out", per_image, "--postprocess", tuned, "--overlays", tmp_path / "overlays"]
    assert _run_command(evaluate, argv) == 0
    assert "challenge Dice" in capsys.readouterr().out
    frame = pd.read_csv(per_image)
    assert list(frame.columns) == ["ImageId", "dice", "iou", "true_area", "pred_area", "score"]
    assert sorted(frame["ImageId"]) == sorted(data.test_ids)
    has_cases = bool((frame["true_area"] > 0).any() or (frame["pred_area"] > 0).any())
    assert (tmp_path / "overlays" / "contact_sheet.png").exists() == has_cases


def _check_the_readme_tune_evaluate_predict_lines(run_dir, data, tmp_path, capsys):
    """The README's "Tune, evaluate, predict, submit" block, run as written on this run and data (its paths and the
    two-checkpoint run's --average-top 2 put in), each line checked on one figure."""
    import re
    import shlex

    from siim_jax import cli
    from siim_jax.data.labels import read_labels

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### Tune, evaluate, predict, submit")[1].split("```bash\n")[1].split("```")[0]
    replacements = {"runs/unet_resnet50": str(run_dir), "--out submission.csv": f"--out {tmp_path / 'readme.csv'}",
                    "DATA/stage_2_sample_submission.csv": str(data.sample_submission_csv), "DATA": str(data.out_dir),
                    "--average-top 3": "--average-top 2"}
    lines = [line for line in block.splitlines() if line.startswith("siim-jax ")]
    assert [line.split()[1] for line in lines] == ["tune", "evaluate", "predict"]
    for line in lines:
        for old, new in replacements.items():
            line = line.replace(old, new)
        capsys.readouterr()
        assert cli.main(shlex.split(line)[1:]) == 0, line
        out = capsys.readouterr().out
        verb = line.split()[1]
        if verb == "tune":  # the Dice it reports for the best setting is the first row of its table
            best = float(re.search(r"wrote the best setting \(Dice ([0-9.]+)\)", out).group(1))
            first_row = out.split("\n")[2].split()
            assert first_row[0] == "1" and float(first_row[1]) == pytest.approx(best, abs=1e-4)
        elif verb == "evaluate":  # each image's true area is its label rows' area, decoded here from the labels
            frame = pd.read_csv(run_dir / "val.csv", dtype={"ImageId": str})
            labels = read_labels(data.out_dir / "train-rle.csv").groupby("ImageId")["EncodedPixels"].apply(list)
            for image_id, true_area in zip(frame["ImageId"], frame["true_area"]):
                assert rle.decode_merged(labels[image_id], 1024, 1024).sum() == true_area, image_id
        else:  # one row per id of the sample submission, in its order
            submission = _read_submission(tmp_path / "readme.csv")
            assert list(submission["ImageId"]) == list(data.test_ids)
