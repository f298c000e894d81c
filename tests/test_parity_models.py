"""Converted Flax models against their PyTorch references, built with random weights (none can be downloaded).

Every case is checked in eval mode and in train mode (first forward's outputs and BatchNorm statistics,
gradients, three Adam steps). How each is measured and bounded: parity_utils. Conversions broken on purpose
must fail the same checks by a wide margin.
"""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from siim_jax.models.layers import BatchNorm
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


def _smp_unet(encoder: str, attention: str | None, **options):
    aux_params = {"classes": 1, "dropout": 0.0}
    return _seeded(
        lambda: smp.Unet(
            encoder, encoder_weights=None, classes=1, decoder_attention_type=attention, aux_params=aux_params,
            **options,
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
    report(run_case(case).eval_check)


# The train-mode checks compile a float64 backward pass per case (1-3 min and several GB on two CPU cores), so
# they share one xdist group: under `pytest -n 2 --dist loadgroup` (the README's command) they run one after another
# on a single worker, and memory holds one float64 case at a time (run_case keeps only the latest).
@pytest.mark.xdist_group("parity-float64")
@pytest.mark.parametrize("check", ["train-outputs", "batchnorm-statistics", "gradients", "adam-steps"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_train_mode(case, check):
    report(run_case(case).training_checks[check])


# Deliberate conversion errors, on a small UNet so that each costs seconds: each must push a check past its
# bound by at least DEFECT_MARGIN, or the bounds would be too loose to catch it.
SMALL_CASE = Case(
    "smp_unet_resnet18_scse_small",
    _smp_unet("resnet18", "scse", decoder_channels=(64, 32, 32, 16, 16)),
    lambda m, x: list(m(x)),
    "smp",
    "unet_resnet18",
)
DEFECT_MARGIN = 100.0


def _batchnorm_epsilon_1e3(model):
    for _, module in model.iter_modules():
        if isinstance(module, BatchNorm):
            module.epsilon = 1e-3  # PyTorch's is 1e-5


def _transposed_kernel(model):
    kernel = model.encoder.layer1[0].conv2.kernel  # 3x3: H and W swapped still fit
    kernel[...] = kernel[...].transpose(1, 0, 2, 3)


def _swapped_blocks(model):
    first, second = model.encoder.layer1  # same shapes: 64 -> 64 channels, stride 1
    first_state, second_state = (jax.tree.map(lambda a: a, nnx.state(block)) for block in (first, second))
    nnx.update(first, second_state)
    nnx.update(second, first_state)


DEFECTS = [_batchnorm_epsilon_1e3, _transposed_kernel, _swapped_blocks]


def test_small_case_passes():
    """The small case converted correctly passes, so the failures below come from the defects alone."""
    run = run_case(SMALL_CASE)
    report(run.eval_check)
    report(run.train_forward_check)


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: d.__name__.lstrip("_"))
def test_broken_conversion_fails(defect):
    run = run_case(SMALL_CASE, defect)
    for check in (run.eval_check, run.train_forward_check):
        print(f"\n{check} (broken: {defect.__name__.lstrip('_')}, {1 / check.margin:.3g} x the bound)")
        assert check.measured > DEFECT_MARGIN * check.bound, str(check)
