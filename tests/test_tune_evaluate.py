import cv2
import numpy as np
import pytest

from siim_jax.data import rle
from siim_jax.data.augment import normalise, resize_pair
from siim_jax.evaluation.evaluate import (
    PER_IMAGE_COLUMNS,
    evaluate_images,
    labelled_frame,
    summarise,
)
from siim_jax.evaluation.oof import FoldPredictions
from siim_jax.evaluation.tune import (
    format_table,
    predict_fold,
    rescale_areas,
    tune,
)
from siim_jax.inference.overlays import SHEET_NAME, OverlayWriter
from siim_jax.inference.postprocess import PostProcess
from siim_jax.inference.predictor import Inference, Predictor
from siim_jax.metrics import roc_auc

from . import dicom_factory as factory
from .helpers import Brightness, challenge_dice, square

MODEL_SIZE = 32
SIZE = 64


def _square(top, left, side):
    return square(SIZE, top, left, side)


# (bright square in the image, labelled square): a hit, a true negative, a false positive, a miss, a partial hit
CASES = [
    (_square(10, 10, 20), _square(10, 10, 20)),
    (None, None),
    (_square(40, 40, 12), None),
    (None, _square(5, 30, 16)),
    (_square(20, 20, 24), _square(28, 20, 24)),
]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    (root / "train").mkdir()
    rows = []
    for number, (bright, truth) in enumerate(CASES):
        pixels = np.full((SIZE, SIZE), 30, np.uint8)
        if bright is not None:
            pixels[bright] = 220
        image_id = f"1.2.840.{number}"
        ds = factory.dataset(pixels, SOPInstanceUID=image_id, PatientID=f"patient-{number}")
        factory.save(ds, root / "train" / f"{image_id}.dcm")
        rows.append(f"{image_id}, {rle.EMPTY if truth is None else rle.encode(truth)}\n")
    (root / "train-rle.csv").write_text("ImageId, EncodedPixels\n" + "".join(rows))
    return root


def preprocess(pixels):
    """The validation preprocessing of the input pipeline: bilinear resize, ImageNet normalisation."""
    return normalise(resize_pair(pixels, None, MODEL_SIZE)[0])


def _predictor():
    return Predictor(Brightness(class_head=False), batch_size=2, tta_hflip=False)


def _inference():
    return Inference(_predictor(), MODEL_SIZE, progress=False)


def test_tune_finds_the_setting_with_the_best_dice_and_writes_json_predict_reads(labelled, tmp_path):
    frame = labelled_frame(labelled / "train", labelled / "train-rle.csv", fold=None)
    fold = predict_fold(_inference(), frame)
    assert fold.resolution == (MODEL_SIZE, MODEL_SIZE) and fold.original_resolution == (SIZE, SIZE)
    grid = {"threshold": [0.1, 0.5, 0.9], "min_component_area": [0, 60]}
    results = tune(fold, grid)
    assert len(results) == 6
    assert [dice for _, dice in results] == sorted((dice for _, dice in results), reverse=True)
    factor = (SIZE / MODEL_SIZE) ** 2
    for setting, dice in results:  # each Dice is that of the model-resolution masks
        at_model_size = rescale_areas(setting, 1 / factor)
        masks = [at_model_size.apply(prob.astype(np.float32)) for prob in fold.probs]
        assert dice == pytest.approx(challenge_dice(masks, fold.truths))
        assert setting.min_component_area in (0, 60 * factor)
    best, _ = results[0]
    best.to_json(tmp_path / "postprocess.json")
    assert PostProcess.from_json(tmp_path / "postprocess.json") == best


def test_tune_default_grid_and_table():
    rng = np.random.default_rng(0)
    probs = [rng.uniform(size=(8, 8)).astype(np.float16) for _ in range(4)]
    truths = [prob > 0.6 for prob in probs]
    fold = FoldPredictions(list("abcd"), probs, truths, [0.9, 0.8, 0.1, 0.2], [(16, 16)] * 4)
    results = tune(fold)
    assert any(setting.class_threshold is not None for setting, _ in results)
    assert any(setting.mode == "triplet" for setting, _ in results)
    table = format_table(results, top=3).splitlines()
    assert len(table) == 4 and table[0].split()[:3] == ["rank", "dice", "mode"]
    assert table[1].split()[0] == "1" and float(table[1].split()[1]) == pytest.approx(results[0][1], abs=1e-4)


def test_evaluate_per_image_table_and_summary(labelled, tmp_path):
    frame = labelled_frame(labelled / "train", labelled / "train-rle.csv", fold=None)
    rule = PostProcess(threshold=0.5)
    overlays = OverlayWriter(tmp_path / "overlays", sample={0}, sheet_size=2, size=64)
    table = evaluate_images(_inference(), frame, rule, overlays)
    assert set(PER_IMAGE_COLUMNS) <= set(table.columns)
    assert list(table["ImageId"]) == list(frame["image_id"])

    predicted, truths = [], []
    for (_, row), (_bright, truth) in zip(frame.iterrows(), CASES):
        pixels = factory.read_back(row["path"]).pixel_array
        probs, _ = _predictor()(preprocess(pixels)[None])
        predicted.append(rule.apply(cv2.resize(probs[0], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)))
        truths.append(np.zeros((SIZE, SIZE), bool) if truth is None else truth)
    per_image = [challenge_dice([p], [t]) for p, t in zip(predicted, truths)]
    np.testing.assert_allclose(table["dice"], per_image)
    np.testing.assert_array_equal(table["pred_area"], [p.sum() for p in predicted])
    np.testing.assert_array_equal(table["true_area"], [t.sum() for t in truths])
    assert per_image[0] > 0.9 and per_image[1] == 1 and per_image[2] == 0 and per_image[3] == 0

    summary = summarise(table)
    assert summary["dice"] == pytest.approx(challenge_dice(predicted, truths))
    positive = [t.any() for t in truths]
    assert summary["dice_positive"] == pytest.approx(np.mean([d for d, p in zip(per_image, positive) if p]))
    assert summary["auc"] == pytest.approx(roc_auc(table["score"], positive))
    assert summary["n_images"] == len(CASES)

    assert [path.name for path in overlays.written] == [f"{frame['image_id'][0]}.png"]
    assert overlays.finish() == tmp_path / "overlays" / SHEET_NAME


def test_labelled_frame_selects_one_fold(labelled):
    everything = labelled_frame(labelled / "train", labelled / "train-rle.csv", fold=None)
    folds = [labelled_frame(labelled / "train", labelled / "train-rle.csv", fold=k) for k in range(5)]
    assert sorted(sum((list(f["image_id"]) for f in folds), [])) == sorted(everything["image_id"])
    with pytest.raises(ValueError, match="fold"):
        labelled_frame(labelled / "train", labelled / "train-rle.csv", fold=5)
