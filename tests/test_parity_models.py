"""Converted Flax models against their PyTorch references, built with random weights (none can be downloaded).

Every case is checked in eval mode and in train mode (first forward's outputs and BatchNorm statistics,
gradients, three Adam steps). How each is measured: parity_utils.
"""

from __future__ import annotations

import pytest

from tests.conftest import reference_import

torch = reference_import("torch")
torchvision = reference_import("torchvision")
timm = reference_import("timm")
smp = reference_import("segmentation_models_pytorch")

from tests.parity_utils import Case, calibrate_batchnorm, report, run_case  # noqa: E402


def _seeded(factory):
    def make():
        torch.manual_seed(0)
        return calibrate_batchnorm(factory())

    return make


def _torchvision_features(model, x):
    x = model.relu(model.bn1(model.conv1(x)))
    features = [x]
    x = model.maxpool(x)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        features.append(x)
    return features


def _smp_unet(encoder: str, attention: str | None):
    aux_params = {"classes": 1, "dropout": 0.0}
    return _seeded(
        lambda: smp.Unet(
            encoder, encoder_weights=None, classes=1, decoder_attention_type=attention, aux_params=aux_params
        )
    )


def _unet_case(encoder: str, attention: str | None) -> Case:
    name = f"smp_unet_{encoder}" + ("_scse" if attention else "")
    return Case(name, _smp_unet(encoder, attention), lambda m, x: list(m(x)), "smp", f"unet_{encoder}")


CASES = [
    Case(
        "torchvision_resnet50",
        _seeded(torchvision.models.resnet50),
        _torchvision_features,
        "torchvision",
        "resnet50",
    ),
    Case(
        "timm_seresnext50_32x4d",
        _seeded(lambda: timm.create_model("seresnext50_32x4d", pretrained=False, features_only=True)),
        lambda m, x: m(x),
        "timm",
        "seresnext50_32x4d",
    ),
    Case(
        "cadene_se_resnext50_32x4d",
        _seeded(lambda: smp.encoders.get_encoder("se_resnext50_32x4d", weights=None)),
        lambda m, x: m(x)[1:],  # smp's encoders also return the input
        "cadene",
        "se_resnext50_32x4d",
    ),
    _unet_case("resnet50", None),
    _unet_case("resnet50", "scse"),
    _unet_case("se_resnext50_32x4d", None),
    _unet_case("se_resnext50_32x4d", "scse"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_eval_outputs(case):
    report("eval-outputs", case.name, run_case(case).eval_difference)


# The train-mode checks compile a float64 backward pass per case (1-3 min and several GB on two CPU cores), so
# they share one xdist group: under `pytest -n 2 --dist loadgroup` (the README's command) they run one after another
# on a single worker, and memory holds one float64 case at a time (run_case keeps only the latest).
@pytest.mark.xdist_group("parity-float64")
@pytest.mark.parametrize("check", ["train-outputs", "batchnorm-statistics", "gradients", "adam-steps"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_train_mode(case, check):
    report(check, case.name, run_case(case).training_differences[check])
