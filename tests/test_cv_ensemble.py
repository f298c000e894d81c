"""Cross-validation, out-of-fold tuning, progressive resizing and ensembles: the README's commands run in small,
the self-ensemble against the single run, and the averaging against a reference computed here."""

import contextlib
import json
import logging
import re
import shlex
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from siim_jax import cli
from siim_jax.evaluation import cv, oof
from siim_jax.evaluation.oof import FoldPredictions
from siim_jax.inference import ensemble
from siim_jax.inference.predictor import Prediction
from siim_jax.metrics import roc_auc

from .helpers import challenge_dice

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SECTION = README.split("## Cross-validation, progressive resizing and ensembles")[1].split("\n## ")[0]
# The module-scoped CV run takes minutes: its tests share one xdist worker so it is built once, not per worker.
pytestmark = pytest.mark.xdist_group("cv_ensemble")

# Small versions of the README's runs: a ResNet18 UNet at 32² (64² for the 1024² stage), three evaluated epochs
# (so that --average-top 3 finds three ranked checkpoints), folds 0 and 1 only, a few images.
TINY_TRAINING = [
    "--config.model.encoder=resnet18", "--config.model.decoder_channels=(16, 8, 8, 8, 8)",
    "--config.data.image_size=32", "--config.train.epochs=3", "--config.train.eval_every_epochs=1",
    "--config.train.batch_size=4", "--config.train.eval_batch_size=4", "--config.train.keep_best=3",
    "--config.optim.warmup_steps=1", "--config.train.eval_at_start=False",
]
TINY_SIZES = {512: 32, 1024: 64}


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", SECTION, flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("siim-jax")]


def readme_ensemble_file() -> dict:
    return json.loads(re.search(r"```json\n(.*?)```", SECTION, flags=re.DOTALL).group(1))


def tiny(command: str) -> list[str]:
    argv = shlex.split(command)[1:]
    if argv[0] == "synth":
        return [*argv, "--n-train", "16", "--n-test", "4", "--positive-fraction", "0.5"]
    if argv[0] in ("cv", "train"):
        argv += TINY_TRAINING
        if "unet_winner:1024" in command:
            argv.append(f"--config.data.image_size={TINY_SIZES[1024]}")
        if argv[0] == "cv":
            argv += ["--folds", "0,1"]
    return _without_later_folds(argv)


def _without_later_folds(argv: list[str]) -> list[str]:
    """The arguments without `--checkpoint .../fold_k` for the folds k >= 2 that the small CV runs leave out."""
    kept = []
    for argument in argv:
        if kept and kept[-1] == "--checkpoint" and re.search(r"fold_[2-9]$", argument):
            kept.pop()
            continue
        kept.append(argument)
    return kept


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """Runs every command of the README's cross-validation section in order, in small, from a folder holding a
    synthetic DATA set with test labels and the README's ensemble file; returns that folder."""
    from siim_jax.data.synthetic import generate

    folder = tmp_path_factory.mktemp("readme")
    generate(folder / "DATA", n_train=16, n_test=4, seed=3, positive_fraction=0.5, stage2=True, progress=False)
    members = readme_ensemble_file()
    for member in members["members"]:
        member["image_size"] = TINY_SIZES[member["image_size"]]
    (folder / "ensemble.json").write_text(json.dumps(members))
    with pytest.MonkeyPatch.context() as patch, _persistent_compilation_cache(folder / "jax_cache"):
        patch.chdir(folder)
        for command in readme_commands():
            assert cli.main(tiny(command)) == 0, command
    return folder


@contextlib.contextmanager
def _persistent_compilation_cache(directory: Path):
    """JAX's on-disk compilation cache for the block: the folds of a CV run compile the same programs, which
    then compile once."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(directory), 0.0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # a cache set up earlier in the process would ignore the new folder
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def test_readme_section_runs_and_cv_writes_its_outputs(readme_runs):
    workdir = readme_runs / "runs" / "cv_resnet50"
    for fold in (0, 1):
        assert (workdir / f"fold_{fold}" / cv.FINISHED_FILE).is_file()
        assert (workdir / f"fold_{fold}" / oof.OOF_FILE).is_file()
    assert (workdir / cv.SUMMARY_PNG).stat().st_size > 0
    assert (workdir / "postprocess.json").is_file()
    for submission in ("submission_cv.csv", "submission_ensemble.csv"):
        assert len(pd.read_csv(readme_runs / submission)) == 4
    assert len(pd.read_csv(readme_runs / "runs" / "ensemble_val.csv")) > 0


def test_cv_summary_matches_the_challenge_metrics_of_the_out_of_fold_predictions(readme_runs):
    workdir = readme_runs / "runs" / "cv_resnet50"
    table = pd.read_csv(workdir / cv.SUMMARY_CSV, index_col=0)
    folds = [oof.load_oof(path) for path in oof.fold_oof_files(workdir).values()]
    for name, predictions in [("fold 0", folds[0]), ("fold 1", folds[1]), ("pooled", oof.concatenate(folds))]:
        probs = np.stack(predictions.probs).astype(np.float32)
        truths = np.stack(predictions.truths)
        assert probs.shape[1:] == (32, 32)  # the training size
        assert table.loc[name, "n_images"] == len(probs)
        assert table.loc[name, "dice"] == pytest.approx(challenge_dice(probs > 0.5, truths))
        positive = truths.any(axis=(1, 2))
        if positive.any():
            expected = challenge_dice(probs[positive] > 0.5, truths[positive])
            assert table.loc[name, "dice_positive"] == pytest.approx(expected)
        expected_auc = roc_auc(probs.max(axis=(1, 2)), positive)  # unet_resnet50 has no class head
        assert np.isnan(expected_auc) == np.isnan(table.loc[name, "auc"])


def test_a_finished_cv_is_not_trained_again(readme_runs, monkeypatch, caplog):
    import siim_jax.training.loop

    def refuse(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(siim_jax.training.loop, "train_and_evaluate", refuse)
    monkeypatch.chdir(readme_runs)
    with caplog.at_level(logging.INFO, logger="siim_jax.evaluation.cv"):
        assert cli.main(tiny(readme_commands()[0])) == 0
    assert "finished earlier" in caplog.text


def test_progressive_stage_starts_from_the_512_run(readme_runs):
    from siim_jax.training.checkpoints import restore_config

    config = restore_config(readme_runs / "runs" / "winner1024")
    assert config.model.init_from == "runs/winner512"
    assert config.data.image_size == TINY_SIZES[1024]
    assert restore_config(readme_runs / "runs" / "winner512").data.image_size == TINY_SIZES[512]


def test_an_ensemble_of_a_run_with_itself_writes_exactly_that_runs_submission(readme_runs):
    run = readme_runs / "runs" / "winner1024"
    common = ["--data", str(readme_runs / "DATA" / "dicom-images-test"), "--best"]
    single, double = readme_runs / "single.csv", readme_runs / "self_ensemble.csv"
    assert cli.main(["predict", "--checkpoint", str(run), *common, "--out", str(single)]) == 0
    twice = ["--checkpoint", str(run), "--checkpoint", str(run)]
    assert cli.main(["predict", *twice, *common, "--out", str(double)]) == 0
    assert single.read_text() == double.read_text()
    assert (pd.read_csv(single)["EncodedPixels"].str.strip() != "-1").any()  # some masks to compare


# ---------------------------------------------------------------------------------------------------- averaging


class _FakeInference:
    """Predictions of fixed probabilities at a member's input size, as `Inference.predictions` yields them."""

    def __init__(self, probs, class_probs, original_sizes):
        self.probs, self.class_probs, self.original_sizes = probs, class_probs, original_sizes

    def predictions(self, items, desc="predict"):
        for index, (image_id, path) in enumerate(items):
            class_prob = None if self.class_probs is None else self.class_probs[index]
            yield Prediction(index, image_id, path, self.probs[index], class_prob, self.original_sizes[index])


def test_ensemble_averages_members_at_each_images_original_size(monkeypatch):
    rng = np.random.default_rng(0)
    original_sizes = [(48, 40), (24, 24)]
    members = [ensemble.Member(Path("a"), weight=3.0, image_size=16), ensemble.Member(Path("b"), image_size=32)]
    outputs = {
        "a": ([rng.random((16, 16), np.float32) for _ in original_sizes], [0.9, 0.2]),
        "b": ([rng.random((32, 32), np.float32) for _ in original_sizes], None),  # no class head
    }
    monkeypatch.setattr(ensemble.Ensemble, "_inference",
                        lambda self, member, first: _FakeInference(*outputs[member.path.name], original_sizes))
    items = [("one", "one.dcm"), ("two", "two.dcm")]
    predictions = list(ensemble.Ensemble(members).predictions(items))
    for index, ((height, width), prediction) in enumerate(zip(original_sizes, predictions)):
        resized = [cv2.resize(outputs[name][0][index], (width, height), interpolation=cv2.INTER_LINEAR)
                   for name in ("a", "b")]
        np.testing.assert_allclose(prediction.prob, (3 * resized[0] + resized[1]) / 4, rtol=1e-6)
        assert prediction.original_size == (height, width)
        assert prediction.class_prob == pytest.approx(outputs["a"][1][index])  # the only member with a head


def test_ensemble_file_errors_name_the_file_and_the_reason(tmp_path):
    cases = {
        "not json": "{",
        "no members": json.dumps({"models": []}),
        "no path": json.dumps({"members": [{"weight": 1}]}),
        "unknown key": json.dumps({"members": [{"path": "a", "size": 512}]}),
        "zero weight": json.dumps({"members": [{"path": "a", "weight": 0}]}),
    }
    for name, text in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_text(text)
        with pytest.raises(ensemble.EnsembleFileError, match=re.escape(str(path))):
            ensemble.read_ensemble_file(path)
    path = tmp_path / "good.json"
    path.write_text(json.dumps({"members": [{"path": "run", "best": True, "image_size": 512, "tta": False}]}))
    expected = ensemble.Member(tmp_path / "run", best=True, image_size=512, tta=False)
    assert ensemble.read_ensemble_file(path) == [expected]


def test_pooled_oof_of_two_runs_averages_them_by_image_id(tmp_path):
    rng = np.random.default_rng(1)
    ids = ["a", "b", "c"]
    truths = [rng.random((8, 8)) > 0.5 for _ in ids]
    first = FoldPredictions(ids, [rng.random((8, 8)).astype(np.float16) for _ in ids], truths, [0.1, 0.5, 0.9],
                            [(64, 64)] * 3)
    second_probs = {image_id: rng.random((16, 16)).astype(np.float16) for image_id in ids}
    order = [2, 0, 1]  # another order of the same images, at another size
    second = FoldPredictions([ids[i] for i in order], [second_probs[ids[i]] for i in order],
                             [truths[i] for i in order], None, [(64, 64)] * 3)
    for name, predictions in (("one", first), ("two", second)):
        (tmp_path / name / "fold_0").mkdir(parents=True)
        oof.save_oof(tmp_path / name / "fold_0" / oof.OOF_FILE, predictions)
    pooled = oof.pooled_oof([tmp_path / "one", tmp_path / "two"])
    assert pooled.image_ids == ids and pooled.class_probs == pytest.approx([0.1, 0.5, 0.9])
    for i, image_id in enumerate(ids):
        other = cv2.resize(second_probs[image_id].astype(np.float32), (8, 8), interpolation=cv2.INTER_LINEAR)
        expected = (first.probs[i].astype(np.float32) + other) / 2
        np.testing.assert_allclose(pooled.probs[i].astype(np.float32), expected, atol=1e-3)
