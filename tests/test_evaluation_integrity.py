"""Evaluation, tuning, out-of-fold predictions and ensembles checked where a plausible bug would hide: the run's own
folds (non-default n_folds and fold_seed), non-square images whose masks change under transposition, image scores
and AUC against hand values and scikit-learn, class probabilities of several weighted members and reordered runs, and
unreadable labelled images (an empty prediction against the true area: 0 when positive, 1 when negative)."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import ml_collections
import numpy as np
import pytest
from siim_jax.configs.defaults import default_data_config

from siim_jax.commands import tune as tune_command
from siim_jax.data import pipeline, rle
from siim_jax.data.augment import normalise, resize_pair
from siim_jax.data.layout import TRAIN_CSV, TRAIN_DIR
from siim_jax.evaluation import cv, oof, tune
from siim_jax.evaluation.evaluate import evaluate_images, labelled_data, labelled_frame, summarise
from siim_jax.inference import ensemble
from siim_jax.inference.predictor import Inference, Prediction, Predictor, UnreadableImageWarning

from . import dicom_factory as factory
from .conftest import reference_import
from .helpers import Brightness, challenge_dice

HEIGHT, WIDTH = 48, 80  # non-square: a transposed mask has the wrong shape, a (width, height) mix-up too
MODEL_SIZE = 32
N_FOLDS, FOLD_SEED, FOLD = 3, 7, 1  # not the defaults (5, 0, 0): code that ignores the run's data config differs
N_IMAGES = 15
UNREADABLE = {"1.2.840.13": True, "1.2.840.14": False}  # ImageId -> its label is positive


def _box(top, left, height, width) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[top : top + height, left : left + width] = True
    return mask


def _case(number: int, rng: np.random.Generator) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(bright box, labelled box) of image `number`: wide flat boxes near the top left, so that neither a transposed
    nor a flipped mask overlaps its truth; hits, misses, false positives and true negatives by turns."""
    height, width = rng.integers(8, 14), rng.integers(24, 40)
    top, left = rng.integers(2, 10), rng.integers(2, 20)
    box = _box(top, left, height, width)
    shifted = _box(top + 3, left + 6, height, width)
    return [(box, box), (box, shifted), (None, box), (box, None), (None, None)][number % 5]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A data root of N_IMAGES non-square labelled DICOMs (one patient each), the last two unreadable (pixel data cut
    short); returns (root, {ImageId: (pixels, truth)})."""
    root = tmp_path_factory.mktemp("labelled")
    (root / TRAIN_DIR).mkdir()
    rng = np.random.default_rng(0)
    rows, cases = [], {}
    for number in range(N_IMAGES):
        image_id = f"1.2.840.{number}"
        bright, truth = _case(number, rng)
        if image_id in UNREADABLE:
            truth = _box(4, 10, 9, 30) if UNREADABLE[image_id] else None
        pixels = np.full((HEIGHT, WIDTH), 30, np.uint8)
        if bright is not None:
            pixels[bright] = 220
        path = root / TRAIN_DIR / f"{image_id}.dcm"
        factory.save(factory.dataset(pixels, SOPInstanceUID=image_id, PatientID=f"patient-{number}"), path)
        if image_id in UNREADABLE:
            path.write_bytes(path.read_bytes()[:-1000])
        truth = np.zeros((HEIGHT, WIDTH), bool) if truth is None else truth
        cases[image_id] = (pixels, truth)
        rows += [f"{image_id}, {rle.encode(truth) if truth.any() else rle.EMPTY}\n"]
    (root / TRAIN_CSV).write_text("ImageId, EncodedPixels\n" + "".join(rows))
    return root, cases


def run_config(root: Path) -> ml_collections.ConfigDict:
    data = default_data_config()
    data.update(root=str(root), image_size=MODEL_SIZE, n_folds=N_FOLDS, fold_seed=FOLD_SEED, fold=FOLD)
    return ml_collections.ConfigDict({"data": data})


def brightness_inference(config=None, class_head=False) -> Inference:
    return Inference(Predictor(Brightness(class_head), batch_size=4, tta_hflip=False), MODEL_SIZE, progress=False,
                     config=config)


def reference_prob(pixels: np.ndarray) -> np.ndarray:
    """The Brightness model's probabilities at MODEL_SIZE, computed here: the validation resize and normalisation,
    then sigmoid(6 x - 3) of the first channel."""
    x = normalise(resize_pair(pixels, None, MODEL_SIZE)[0])[..., 0]
    return 1 / (1 + np.exp(-(6.0 * x - 3.0)))


def nearest(mask: np.ndarray, size: int = MODEL_SIZE) -> np.ndarray:
    return cv2.resize(mask.view(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


# ---------------------------------------------------------------------------------------------------- folds


@pytest.mark.filterwarnings("ignore::siim_jax.inference.predictor.UnreadableImageWarning")
def test_evaluate_tune_and_oof_use_exactly_the_runs_validation_fold(labelled, monkeypatch, tmp_path):
    root, _ = labelled
    config = run_config(root)
    splits = pipeline.build_datasets(config.data)  # what training trains and validates on
    training, validation = set(splits.train["image_id"]), list(splits.val["image_id"])
    assert validation and training

    folds = [labelled_frame(root / TRAIN_DIR, root / TRAIN_CSV, k, config.data) for k in range(N_FOLDS)]
    ids = [set(frame["image_id"]) for frame in folds]
    assert sum(map(len, ids)) == len(set().union(*ids)) == N_IMAGES  # disjoint, and covering every image
    assert list(folds[FOLD]["image_id"]) == validation

    # evaluate and tune given --data and --labels still draw the run's folds
    dicom_dir, labels, data_config = labelled_data(config, root / TRAIN_DIR, root / TRAIN_CSV)
    assert list(labelled_frame(dicom_dir, labels, FOLD, data_config)["image_id"]) == validation

    inference = brightness_inference(config)
    monkeypatch.setattr(tune_command, "inference_from_args", lambda args: inference)
    tuned, source = tune_command._predict_validation_fold(argparse.Namespace(data=None, labels=None, fold=None))
    assert source == f"fold {FOLD}" and tuned.image_ids == validation

    def from_checkpoint(cls, path, **options):
        assert Path(path) == cv.fold_dir(tmp_path, FOLD) and options["image_size"] == MODEL_SIZE
        return inference

    monkeypatch.setattr(Inference, "from_checkpoint", classmethod(from_checkpoint))
    predicted = cv.predict_out_of_fold(config, tmp_path, FOLD)
    assert predicted.image_ids == validation
    assert not set(predicted.image_ids) & training, "training images among the out-of-fold predictions"


# ---------------------------------------------------------------------------------------------------- orientation


def test_evaluate_images_keeps_non_square_images_upright(labelled):
    root, cases = labelled
    frame = labelled_frame(root / TRAIN_DIR, root / TRAIN_CSV, None)
    with pytest.warns(UnreadableImageWarning):
        table = evaluate_images(brightness_inference(), frame).set_index("ImageId")
    for image_id, (pixels, truth) in cases.items():
        row = table.loc[image_id]
        if image_id in UNREADABLE:  # an empty prediction against the true area
            assert (row["pred_area"], row["true_area"]) == (0, truth.sum())
            assert row["dice"] == row["iou"] == (0.0 if UNREADABLE[image_id] else 1.0)
            assert row["score"] == 0.0
            continue
        prob = cv2.resize(reference_prob(pixels), (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
        predicted = prob > 0.5
        assert (row["intersection"], row["pred_area"], row["true_area"]) == (
            np.count_nonzero(predicted & truth), predicted.sum(), truth.sum())
        assert row["dice"] == pytest.approx(challenge_dice([predicted], [truth]))
        assert row["score"] == pytest.approx(reference_prob(pixels).max(), abs=1e-6)  # the top pixel probability
    hits = [image_id for image_id, (pixels, truth) in cases.items() if image_id not in UNREADABLE
            and truth.any() and np.array_equal(pixels > 100, truth)]
    assert hits and all(table.loc[hits, "dice"] > 0.9)  # the model follows the bright box: a hand check


def test_predict_fold_and_out_of_fold_files_keep_non_square_truths_upright(labelled, tmp_path):
    root, cases = labelled
    frame = labelled_frame(root / TRAIN_DIR, root / TRAIN_CSV, None)
    with pytest.warns(UnreadableImageWarning):
        fold = tune.predict_fold(brightness_inference(), frame)
    assert fold.image_ids == list(frame["image_id"]) and fold.original_resolution == (HEIGHT, WIDTH)
    for image_id, prob, truth in zip(fold.image_ids, fold.probs, fold.truths):
        pixels, expected_truth = cases[image_id]
        if image_id in UNREADABLE:
            assert not prob.any() and truth.any() == UNREADABLE[image_id]
            continue
        np.testing.assert_array_equal(truth, nearest(expected_truth))
        np.testing.assert_allclose(prob, reference_prob(pixels), atol=1e-3)  # float16 storage: 2**-11 near 1

    # the CV path: written and read back as `cv` does, then summarised
    oof.save_oof(tmp_path / oof.OOF_FILE, fold)
    metrics = oof.oof_metrics(oof.load_oof(tmp_path / oof.OOF_FILE))
    predicted, truths = [], []
    for image_id, (pixels, truth) in cases.items():
        unreadable = image_id in UNREADABLE
        predicted.append(np.zeros((MODEL_SIZE,) * 2, bool) if unreadable else reference_prob(pixels) > 0.5)
        truths.append(np.full((MODEL_SIZE,) * 2, UNREADABLE[image_id]) if unreadable else nearest(truth))
    assert metrics["dice"] == pytest.approx(challenge_dice(predicted, truths))


# ---------------------------------------------------------------------------------------------------- scores and AUC


class FixedInference:
    """Hand-made predictions at the original size, as `Inference.predictions` yields them."""

    def __init__(self, probs: dict, class_probs: dict | None = None):
        self.probs, self.class_probs = probs, class_probs

    def predictions(self, items, desc="predict"):
        for index, (image_id, path) in enumerate(items):
            prob = self.probs.get(image_id)
            class_prob = None if self.class_probs is None or prob is None else self.class_probs[image_id]
            yield Prediction(index, image_id, path, prob, class_prob, None if prob is None else prob.shape)


def test_image_scores_are_the_class_or_top_pixel_probability_and_auc_matches_sklearn(labelled):
    roc_auc_score = reference_import("sklearn.metrics").roc_auc_score
    root, cases = labelled
    frame = labelled_frame(root / TRAIN_DIR, root / TRAIN_CSV, None)
    rng = np.random.default_rng(1)
    readable = [image_id for image_id in cases if image_id not in UNREADABLE]
    tops = dict(zip(readable, rng.permutation(len(readable)) / len(readable) * 0.8 + 0.1))  # hand values
    probs = {}
    for image_id, top in tops.items():  # a faint map whose one brightest pixel is `top`
        prob = np.full((HEIGHT, WIDTH), 0.05, np.float32)
        prob[rng.integers(HEIGHT), rng.integers(WIDTH)] = top
        probs[image_id] = prob
    class_probs = {image_id: float(v) for image_id, v in zip(readable, rng.uniform(size=len(readable)))}
    positive = [cases[image_id][1].any() for image_id in frame["image_id"]]

    for heads, expected in ((None, tops), (class_probs, class_probs)):
        table = evaluate_images(FixedInference(probs, heads), frame)
        scores = [expected.get(image_id, 0.0) for image_id in frame["image_id"]]  # unreadable: 0
        np.testing.assert_allclose(table["score"], scores, rtol=1e-6)
        assert summarise(table)["auc"] == pytest.approx(roc_auc_score(positive, scores))

    # out of fold, at the model's resolution, the score is the same
    predictions = oof.FoldPredictions(readable, [probs[i].astype(np.float16) for i in readable],
                               [cases[i][1] for i in readable], None, [(HEIGHT, WIDTH)] * len(readable))
    labels = [cases[image_id][1].any() for image_id in readable]
    f16_tops = [float(np.float16(tops[image_id])) for image_id in readable]
    assert oof.oof_metrics(predictions)["auc"] == pytest.approx(roc_auc_score(labels, f16_tops))
    predictions.class_probs = [class_probs[image_id] for image_id in readable]
    assert oof.oof_metrics(predictions)["auc"] == pytest.approx(roc_auc_score(labels, predictions.class_probs))


# ---------------------------------------------------------------------------------------------------- ensembles


class _MemberInference:
    """A member's predictions: fixed probabilities at its input size, class probabilities or None."""

    def __init__(self, probs, class_probs, original_size):
        self.probs, self.class_probs, self.original_size = probs, class_probs, original_size

    def predictions(self, items, desc="predict"):
        for index, (image_id, path) in enumerate(items):
            class_prob = None if self.class_probs is None else self.class_probs[index]
            yield Prediction(index, image_id, path, self.probs[index], class_prob, self.original_size)


def test_ensemble_class_probability_is_the_weighted_mean_of_the_members_with_a_head(monkeypatch):
    rng = np.random.default_rng(2)
    items = [(f"image-{i}", f"{i}.dcm") for i in range(4)]
    members = [ensemble.Member(Path("a"), weight=2.5), ensemble.Member(Path("b"), weight=0.5),
               ensemble.Member(Path("c"), weight=1.0)]
    outputs = {name: ([rng.random((HEIGHT, WIDTH), np.float32) for _ in items], heads)
               for name, heads in (("a", rng.random(4)), ("b", rng.random(4)), ("c", None))}
    monkeypatch.setattr(ensemble.Ensemble, "_inference",
                        lambda self, member, first: _MemberInference(*outputs[member.path.name], (HEIGHT, WIDTH)))
    for index, prediction in enumerate(ensemble.Ensemble(members).predictions(items)):
        (a, ca), (b, cb), (c, _) = ((outputs[n][0][index], outputs[n][1]) for n in "abc")
        np.testing.assert_allclose(prediction.prob, (2.5 * a + 0.5 * b + c) / 4.0, rtol=1e-6)
        assert prediction.class_prob == pytest.approx((2.5 * ca[index] + 0.5 * cb[index]) / 3.0)


def test_pooled_oof_class_probabilities_follow_each_runs_own_image_order(tmp_path):
    rng = np.random.default_rng(3)
    ids = [f"image-{i}" for i in range(6)]
    truths = {image_id: rng.random((8, 8)) > 0.5 for image_id in ids}
    probs = {run: {image_id: rng.random((8, 8)).astype(np.float16) for image_id in ids} for run in "xyz"}
    heads = {"x": dict(zip(ids, rng.random(6))), "y": dict(zip(ids, rng.random(6))), "z": None}
    orders = {"x": ids, "y": [ids[i] for i in (4, 2, 0, 5, 1, 3)], "z": [ids[i] for i in (5, 4, 3, 2, 1, 0)]}
    for run, order in orders.items():  # two folds each, split differently
        for fold, part in enumerate((order[:2], order[2:])):
            class_probs = None if heads[run] is None else [heads[run][i] for i in part]
            predictions = oof.FoldPredictions(part, [probs[run][i] for i in part], [truths[i] for i in part],
                                               class_probs, [(64, 64)] * len(part))
            (tmp_path / run / f"fold_{fold}").mkdir(parents=True)
            oof.save_oof(tmp_path / run / f"fold_{fold}" / oof.OOF_FILE, predictions)
    pooled = oof.pooled_oof([tmp_path / run for run in "xyz"])
    assert pooled.image_ids == ids
    for image_id, class_prob, prob in zip(pooled.image_ids, pooled.class_probs, pooled.probs):
        assert class_prob == pytest.approx((heads["x"][image_id] + heads["y"][image_id]) / 2)
        expected = np.mean([probs[run][image_id].astype(np.float32) for run in "xyz"], axis=0)
        np.testing.assert_allclose(prob.astype(np.float32), expected, atol=1e-3)  # float16: 2**-11 near 1


# ---------------------------------------------------------------------------------------------------- unreadable


def test_unreadable_labelled_images_score_as_empty_predictions_in_tune_and_ensembles(labelled, monkeypatch):
    root, cases = labelled
    frame = labelled_frame(root / TRAIN_DIR, root / TRAIN_CSV, None)
    with pytest.warns(UnreadableImageWarning):
        fold = tune.predict_fold(brightness_inference(class_head=True), frame)
    position = {image_id: fold.image_ids.index(image_id) for image_id in UNREADABLE}
    assert all(fold.class_probs[position[image_id]] == 0.0 for image_id in UNREADABLE)
    (setting, dice), = tune.tune(fold, {"threshold": [0.5]})
    per_image = []
    for image_id, (pixels, truth) in cases.items():
        if image_id in UNREADABLE:
            per_image.append(0.0 if UNREADABLE[image_id] else 1.0)
        else:
            per_image.append(challenge_dice([reference_prob(pixels) > 0.5], [nearest(truth)]))
    assert dice == pytest.approx(np.mean(per_image))

    members = [ensemble.Member(Path("a"), weight=2.0), ensemble.Member(Path("b"))]
    monkeypatch.setattr(ensemble.Ensemble, "_inference", lambda self, member, first: brightness_inference())
    with pytest.warns(UnreadableImageWarning):
        table = evaluate_images(ensemble.Ensemble(members, progress=False), frame).set_index("ImageId")
    for image_id, positive in UNREADABLE.items():
        assert table.loc[image_id, "dice"] == (0.0 if positive else 1.0)
        assert table.loc[image_id, "true_area"] == cases[image_id][1].sum()
