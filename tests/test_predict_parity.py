"""`siim-jax predict` on a converted smp checkpoint writes the masks PyTorch inference of that checkpoint gives."""

import argparse

import cv2
import numpy as np
import pandas as pd
import pytest

from siim_jax.data import rle
from siim_jax.data.augment import normalise, resize_pair
from siim_jax.data.dicom import read_dicom
from siim_jax.inference.postprocess import PostProcess

from . import dicom_factory as factory
from .conftest import reference_import

torch = reference_import("torch")
smp = reference_import("segmentation_models_pytorch")

MODEL_SIZE = 64
DECODER_CHANNELS = (32, 16, 16, 8, 8)
SHAPES = [(96, 96), (80, 112), (128, 96)]
MARGIN = 1e-4  # pixels this close to the threshold may fall on either side


def _model_input(pixels):
    """The validation preprocessing: bilinear resize, ImageNet normalisation, grey to three channels."""
    return normalise(resize_pair(pixels, None, MODEL_SIZE)[0])


def _torch_probabilities(model, pixels, resize=True):
    """The reference: same input, hflip TTA, sigmoid, bilinear resize to the original size, in PyTorch."""
    x = torch.from_numpy(_model_input(pixels)).permute(2, 0, 1)[None]
    with torch.no_grad():
        masks, labels = model(torch.cat([x, x.flip(-1)]))
    probs = torch.sigmoid(masks[:, 0])
    prob = ((probs[0] + probs[1].flip(-1)) / 2).numpy()
    class_prob = float(torch.sigmoid(labels[:, 0]).mean())
    if resize:
        prob = cv2.resize(prob, pixels.shape[::-1], interpolation=cv2.INTER_LINEAR)
    return prob, class_prob


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from siim_jax.models.convert import convert_with_config
    from siim_jax.models.io import save_model

    torch.manual_seed(0)
    reference = smp.Unet("resnet18", encoder_weights=None, decoder_channels=DECODER_CHANNELS, classes=1,
                         aux_params={"classes": 1}).eval()
    with torch.no_grad():  # non-trivial running statistics, so that eval-mode BatchNorm matters
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    model, model_config = convert_with_config(reference.state_dict(), source="smp", arch="unet_resnet18")
    folder = tmp_path_factory.mktemp("converted") / "model"
    save_model(folder, model, model_config)
    return reference, folder


def test_predict_with_converted_smp_checkpoint_matches_pytorch(converted, tmp_path):
    from siim_jax.commands import arguments, predict
    from siim_jax.inference import submission

    reference, model_dir = converted
    rng = np.random.default_rng(0)
    (tmp_path / "test").mkdir()
    for number, shape in enumerate(SHAPES):
        pixels = cv2.GaussianBlur(rng.uniform(0, 255, shape).astype(np.float32), (0, 0), 6)
        pixels = cv2.normalize(pixels, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        factory.save(factory.dataset(pixels, SOPInstanceUID=f"9.9.{number}"), tmp_path / "test" / f"9.9.{number}.dcm")
    images = {path.stem: read_dicom(path).pixels for path in sorted((tmp_path / "test").iterdir())}
    expected = {image_id: _torch_probabilities(reference, pixels) for image_id, pixels in images.items()}
    # A threshold inside the range of the probabilities, so that the masks are neither empty nor full.
    threshold = float(np.median(np.concatenate([prob.ravel() for prob, _ in expected.values()])))

    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    args = parser.parse_args([
        "--checkpoint", str(model_dir), "--image-size", str(MODEL_SIZE), "--data", str(tmp_path / "test"),
        "--out", str(tmp_path / "submission.csv"), "--batch-size", "2",
    ])
    inference = arguments.inference_from_args(args)
    inference.progress = False
    items = submission.submission_items(args.data)
    submission.predict_submission(inference, items, args.out, PostProcess(threshold=threshold))

    # The model-resolution outputs, class probability included, before resizing and thresholding.
    first = next(iter(images.values()))
    probs, class_probs = inference.predictor(_model_input(first)[None])
    reference_probs, reference_class = _torch_probabilities(reference, first, resize=False)
    np.testing.assert_allclose(probs[0], reference_probs, atol=MARGIN)
    np.testing.assert_allclose(class_probs[0], reference_class, atol=MARGIN)

    submission = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    assert sorted(submission["ImageId"]) == sorted(images)
    for image_id, encoded in zip(submission["ImageId"], submission["EncodedPixels"]):
        prob, _ = expected[image_id]
        mask = rle.decode(encoded, *prob.shape)
        reference_mask = prob > threshold
        assert 0.1 < reference_mask.mean() < 0.9
        disagree = mask != reference_mask
        assert np.all(np.abs(prob[disagree] - threshold) < MARGIN), f"{disagree.sum()} pixels differ in {image_id}"
