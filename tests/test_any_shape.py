"""Images of any shape: a lesion drawn in the top-left corner of non-square radiographs comes back there, at each
image's own Rows x Columns, in every output (the submission's RLE, overlays, DICOM SEG, evaluation, tuning,
ensembles); and a tiny model trains on a mixed-shape synthetic set and predicts masks of each source's shape.

The geometry tests predict with `helpers.Brightness`, whose mask follows the image's brightness, so the expected
mask is the drawn lesion whatever training would give: only the pipeline's geometry is under test. The lesion is
the top quarter of the rows and the left third of the columns, so a transposed mask, or one resized with (height,
width) where OpenCV takes (width, height), misses it by far more than the band allowed at its edge.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

from siim_jax.commands import predict as predict_command
from siim_jax.data import rle
from siim_jax.data.labels import build_index
from siim_jax.evaluation import evaluate, tune
from siim_jax.inference import ensemble
from siim_jax.inference.dicom_seg import DicomSegWriter
from siim_jax.inference.overlays import OverlayWriter
from siim_jax.inference.predictor import Inference, Prediction, Predictor
from siim_jax.inference.submission import predict_submission, submission_items
from tests.helpers import Brightness, read_png, top_left_lesion, write_lesion_dicom

MODEL_SIZE = 64
# ImageId -> (Rows, Columns), PhotometricInterpretation: wide, tall (stored inverted) and square
SOURCES = {
    "1.9.1": ((96, 160), "MONOCHROME2"),
    "1.9.2": ((160, 96), "MONOCHROME1"),
    "1.9.3": ((128, 128), "MONOCHROME2"),
}


def lesion_tree(folder: Path) -> Path:
    for image_id, (shape, photometric) in SOURCES.items():
        write_lesion_dicom(folder / image_id / f"{image_id}.dcm", shape, photometric)
    return folder


def edge_band(shape: tuple[int, int], model_size: int) -> int:
    """Source pixels either side of the lesion's edge where a mask may differ from it: the image is squeezed to
    model_size² and the probabilities resized back (bilinear), which moves the 0.5 crossing of a step edge by
    less than one model pixel, up to max(H, W) / model_size source pixels (measured: at most 1 pixel at 64², 3 at
    32² for a 300x200 image)."""
    return math.ceil(max(shape) / model_size)


def assert_top_left(mask: np.ndarray, shape: tuple[int, int], band: int, what: str) -> None:
    """`mask` has `shape` and equals the top-left lesion except within `band` pixels of the lesion's edge."""
    assert mask.shape == shape, f"{what}: a {mask.shape} mask for a {shape} image"
    lesion = top_left_lesion(shape).view(np.uint8)
    kernel = np.ones((2 * band + 1, 2 * band + 1), np.uint8)
    inside = cv2.erode(lesion, kernel).astype(bool)  # the image's border does not erode (OpenCV's default)
    outside = ~cv2.dilate(lesion, kernel).astype(bool)
    assert mask[inside].all() and not mask[outside].any(), f"{what}: not the top-left lesion"


def brightness_inference(image_size: int = MODEL_SIZE) -> Inference:
    return Inference(Predictor(Brightness(class_head=False), batch_size=2), image_size, progress=False)


def submission_masks(path: Path) -> dict[str, np.ndarray]:
    """Each row's mask, decoded at its source's Rows x Columns."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return {image_id: rle.decode(encoded, *SOURCES[image_id][0]) for image_id, encoded in frame.values}


def test_a_top_left_lesion_comes_back_top_left_in_the_submission_overlays_and_dicom_seg(tmp_path):
    data = lesion_tree(tmp_path / "data")
    overlays = OverlayWriter(tmp_path / "overlays", size=160)
    segs = DicomSegWriter(tmp_path / "seg")
    predict_submission(brightness_inference(), submission_items(data), tmp_path / "submission.csv",
                       overlays=overlays, dicom_seg=segs)
    masks = submission_masks(tmp_path / "submission.csv")
    assert sorted(masks) == sorted(SOURCES)
    for image_id, mask in masks.items():
        shape = SOURCES[image_id][0]
        assert_top_left(mask, shape, edge_band(shape, MODEL_SIZE), f"submission {image_id}")

        picture = read_png(tmp_path / "overlays" / f"{image_id}.png")
        drawn = tuple(round(side * 160 / max(shape)) for side in shape)  # the longer side at 160, the aspect kept
        assert picture.shape == (*drawn, 3)
        red = (picture[..., 0] == 255) & (picture[..., 1] == 0) & (picture[..., 2] == 0)
        near_lesion = cv2.dilate(top_left_lesion(drawn).view(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert red.any() and not red[~near_lesion].any(), f"overlay {image_id}: a contour away from the lesion"

        seg = pydicom.dcmread(tmp_path / "seg" / f"{image_id}.seg.dcm")
        assert (seg.Rows, seg.Columns) == shape
        np.testing.assert_array_equal(seg.pixel_array.astype(bool), mask)


def labelled_frame(data: Path, tmp_path: Path) -> pd.DataFrame:
    """The index of the lesion tree labelled with its lesions, encoded at each image's own size."""
    labels = tmp_path / "labels.csv"
    rows = [f"{image_id},{rle.encode(top_left_lesion(shape))}" for image_id, (shape, _) in SOURCES.items()]
    labels.write_text("ImageId,EncodedPixels\n" + "\n".join(rows) + "\n")
    return build_index(data, labels, n_folds=2).frame


def test_evaluation_and_tuning_decode_labels_at_each_images_size(tmp_path):
    frame = labelled_frame(lesion_tree(tmp_path / "data"), tmp_path)
    table = evaluate.evaluate_images(brightness_inference(), frame).set_index("ImageId")
    for image_id, (shape, _) in SOURCES.items():
        assert table.loc[image_id, "true_area"] == top_left_lesion(shape).sum()  # the label at its own size
    # The masks differ from the lesions only within their edge bands (1 pixel measured at 64²): Dice 0.99 and up.
    assert (table["dice"] > 0.97).all()

    fold = tune.predict_fold(brightness_inference(), frame)
    for image_id, truth, prob in zip(fold.image_ids, fold.truths, fold.probs):
        shape = SOURCES[image_id][0]
        # At the model's resolution, the label squeezed as training squeezes it: a top-left lesion still.
        assert_top_left(truth, (MODEL_SIZE, MODEL_SIZE), 1, f"tuning truth {image_id}")
        assert_top_left(prob > 0.5, (MODEL_SIZE, MODEL_SIZE), 1, f"tuning probabilities {image_id}")
        assert fold.original_sizes[fold.image_ids.index(image_id)] == shape
    _, dice = tune.tune(fold)[0]
    assert dice > 0.97


def test_an_ensembles_final_masks_keep_the_lesion_top_left(tmp_path, monkeypatch):
    sizes = {"small": 32, "large": 64}  # members at two input sizes, averaged at each image's own size
    monkeypatch.setattr(ensemble.Ensemble, "_inference",
                        lambda self, member, first: brightness_inference(sizes[member.path.name]))
    members = [ensemble.Member(Path("small")), ensemble.Member(Path("large"), weight=2.0)]
    segs = DicomSegWriter(tmp_path / "seg")
    predict_submission(ensemble.Ensemble(members, batch_size=2), submission_items(lesion_tree(tmp_path / "data")),
                       tmp_path / "submission.csv", dicom_seg=segs)
    for image_id, mask in submission_masks(tmp_path / "submission.csv").items():
        shape = SOURCES[image_id][0]
        assert_top_left(mask, shape, edge_band(shape, min(sizes.values())), f"ensemble {image_id}")
        seg = pydicom.dcmread(tmp_path / "seg" / f"{image_id}.seg.dcm")
        np.testing.assert_array_equal(seg.pixel_array.astype(bool), mask)  # the ensemble's final mask


# ---------------------------------------------------------------------------------------------------- trained


SYNTH_SHAPES = [(96, 160), (160, 96), (128, 128)]


def _run(module, argv) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(arg) for arg in argv]))


def test_a_tiny_model_trains_on_mixed_shapes_and_predicts_masks_of_each_sources_shape(tiny_model, tmp_path):
    from siim_jax.config_utils import load_config
    from siim_jax.data.synthetic import generate
    from siim_jax.training import loop as train

    data = generate(tmp_path / "data", n_train=8, n_test=3, seed=4, positive_fraction=0.5, stage2=True,
                    shapes=SYNTH_SHAPES, progress=False)
    config = load_config(f"demo:{data.out_dir}")
    config.data.update(image_size=32, n_folds=2, prefetch=0, workers=0)
    config.train.update(epochs=1, batch_size=2, eval_batch_size=2, eval_at_start=False)
    config.optim.warmup_steps = 1
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert result["step"] > 0 and np.isfinite(result["dice"])

    test_dir = data.out_dir / "dicom-images-test"
    argv = ["--checkpoint", tmp_path / "run", "--data", test_dir, "--out", tmp_path / "submission.csv",
            "--dicom-seg", tmp_path / "seg", "--dicom-seg-empty", "--workers", 0, "--no-compilation-cache"]
    assert _run(predict_command, argv) == 0
    rows = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False).set_index("ImageId")
    for index, image_id in enumerate(data.test_ids):
        shape = SYNTH_SHAPES[index % len(SYNTH_SHAPES)]
        source = pydicom.dcmread(next(test_dir.rglob(f"{image_id}.dcm")), stop_before_pixels=True)
        assert (source.Rows, source.Columns) == shape
        seg = pydicom.dcmread(tmp_path / "seg" / f"{image_id}.seg.dcm")  # --dicom-seg-empty: one per image
        assert (seg.Rows, seg.Columns) == shape
        mask = rle.decode(rows.loc[image_id, "EncodedPixels"], *shape)
        np.testing.assert_array_equal(seg.pixel_array.astype(bool), mask)


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
def test_probabilities_go_back_to_the_images_rows_and_columns(shape):
    # A map whose left half is 1, at the model's square size, resized to a non-square image: still the left half.
    prob = np.zeros((MODEL_SIZE, MODEL_SIZE), np.float32)
    prob[:, : MODEL_SIZE // 2] = 1.0
    prediction = Prediction(0, "x", None, prob, None, shape)
    full = prediction.prob_at_original_size()
    assert full.shape == shape
    assert (full[:, : shape[1] // 2 - 2] > 0.5).all() and (full[:, shape[1] // 2 + 2 :] < 0.5).all()
