"""`siim-jax export`: the ONNX model (in onnxruntime on the CPU) and the StableHLO artifact (reloaded with
`jax.export.deserialize`, without the model's code) give the probabilities `predict`'s `Inference` gives with TTA
off, on the same DICOMs, for ResNet18/34/50 UNets with and without SCSE and the classification head."""

import sys

import cv2
import jax
import numpy as np
import pytest
from siim_jax.configs.defaults import default_model_config

from siim_jax import cli
from siim_jax.data.dicom import read_dicom
from siim_jax.inference import export
from siim_jax.inference.predictor import Inference
from siim_jax.models.io import save_model

from . import dicom_factory as factory
from .conftest import reference_import
from .helpers import EXPORT_TOLERANCE, calibrated_model, smooth_grey

pytestmark = pytest.mark.xdist_group("export")  # one worker imports jax2onnx's plugins (seconds) once

SIZE = 64
SHAPES = [(64, 64), (80, 96), (96, 72)]  # one at the model's size, two resized to it
# Every encoder, SCSE on and off, the class head on and off. Left out: ResNet50 with SCSE, whose random weights
# make it too ill-conditioned to test this way: its float32 probabilities differ from its own float64 ones by
# 1.9e-4 in JAX (9.5e-5 in onnxruntime), so two float32 implementations cannot agree within the bound.
CONFIGS = {  # name: (encoder, attention, class head)
    "resnet18": ("resnet18", None, False),
    "resnet34-scse-cls": ("resnet34", "scse", True),
    "resnet50-cls": ("resnet50", None, True),
}


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicoms")
    for number, shape in enumerate(SHAPES):
        uid = f"9.9.{number}"
        factory.save(factory.dataset(smooth_grey(shape, number), SOPInstanceUID=uid), folder / f"{uid}.dcm")
    return sorted(folder.iterdir())


def model_images(paths) -> np.ndarray:
    """The uint8 batch a deployment hands the exported model: each DICOM read and resized bilinearly."""
    return np.stack([cv2.resize(read_dicom(path).pixels, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
                     for path in paths])


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, dicoms, tmp_path_factory):
    """(model directory, class head?, Inference's mask probabilities and class probabilities or None)."""
    encoder, attention, cls_head = CONFIGS[request.param]
    model_config = default_model_config()
    model_config.update(encoder=encoder, attention=attention, cls_head=cls_head)
    calibration = np.stack([smooth_grey((SIZE, SIZE), seed) for seed in range(10, 14)])
    folder = tmp_path_factory.mktemp(request.param) / "model"
    save_model(folder, calibrated_model(model_config, calibration), model_config)
    inference = Inference.from_checkpoint(folder, image_size=SIZE, batch_size=4, tta=False, progress=False)
    predictions = list(inference.predictions([(path.stem, str(path)) for path in dicoms]))
    probs = np.stack([prediction.prob for prediction in predictions])
    class_probs = np.array([prediction.class_prob for prediction in predictions]) if cls_head else None
    return folder, probs, class_probs


def assert_close(outputs, probs, class_probs, record_property, form):
    """The largest differences from Inference, recorded for the report, are within EXPORT_TOLERANCE."""
    expected = (probs,) if class_probs is None else (probs, class_probs)
    assert len(outputs) == len(expected)
    for name, actual, reference in zip(export.OUTPUT_NAMES, outputs, expected):
        difference = float(np.max(np.abs(np.asarray(actual) - reference)))
        record_property(f"{form} {name} max difference", difference)
        assert difference <= EXPORT_TOLERANCE, (name, difference)


def test_onnx_matches_inference(case, dicoms, tmp_path, record_property):
    ort = reference_import("onnxruntime")
    folder, probs, class_probs = case
    path = export.export_checkpoint(folder, tmp_path / "unet.onnx", "onnx", image_size=SIZE)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert image_input.name == "image" and image_input.type == "tensor(uint8)"
    assert image_input.shape == [export.BATCH, SIZE, SIZE]  # the batch is dynamic
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["image_size"] == str(SIZE) and "normalisation" in metadata["image"]
    images = model_images(dicoms)
    outputs = session.run(None, {"image": images})
    assert_close(outputs, probs, class_probs, record_property, "onnx")
    single = session.run(None, {"image": images[1:2]})  # another batch size, the same model
    np.testing.assert_allclose(single[0][0], outputs[0][1], atol=EXPORT_TOLERANCE)


def test_stablehlo_matches_inference(case, dicoms, tmp_path, record_property, capsys):
    folder, probs, class_probs = case
    out = tmp_path / "unet.stablehlo"
    argv = ["export", "--checkpoint", str(folder), "--image-size", str(SIZE), "--format", "stablehlo", str(out)]
    assert cli.main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    exported = jax.export.deserialize(out.read_bytes())
    assert exported.platforms == export.PLATFORMS
    batch, *size = exported.in_avals[0].shape
    assert not isinstance(batch, int) and size == [SIZE, SIZE]  # symbolic batch
    assert_close(exported.call(model_images(dicoms)), probs, class_probs, record_property, "stablehlo")


@pytest.mark.parametrize("case", ["resnet18"], indirect=True)
def test_an_export_with_the_wrong_normalisation_fails_the_bound(case, dicoms, tmp_path, monkeypatch, record_property):
    """What the parity tests guard against: grey levels divided by 256 instead of 255 before the ImageNet
    normalisation, a 0.4% change of contrast."""
    from siim_jax.inference import predictor as predict

    ort = reference_import("onnxruntime")
    folder, probs, _ = case
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    monkeypatch.setattr(predict, "model_input", lambda images: (images[..., None] / 256.0 - mean) / std)
    path = export.export_checkpoint(folder, tmp_path / "unet.onnx", "onnx", image_size=SIZE)
    (mask,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"image": model_images(dicoms)})
    difference = float(np.max(np.abs(mask - probs)))
    record_property("wrong normalisation max difference", difference)
    assert difference > EXPORT_TOLERANCE


def test_onnx_without_the_export_extra_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(SystemExit, match=r"pip install 'siim-jax\[export\]'"):
        cli.main(["export", "--checkpoint", str(tmp_path / "absent"), "--format", "onnx", str(tmp_path / "m.onnx")])
    assert not (tmp_path / "m.onnx").exists()
