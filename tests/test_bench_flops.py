"""The benchmark's FLOP count (tools/train_bench/flops.py, counted on the train step's jaxpr) against PyTorch's
`FlopCounterMode` on the same smp model, and both against hand counts of single layers.

The counts are sums of exact integer products (float64 holds them exactly below 2**53), so where two counts are
of the same products they are asserted equal, not merely within the 2% the benchmark promises.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from .conftest import reference_import

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from train_bench.flops import function_flops  # noqa: E402

SIZE, BATCH = 64, 2


def conv_forward_flops(n, c_in, c_out, groups, kernel, out_side) -> int:
    """Hand count: 2 x every output element x its products (c_in / groups input channels x the kernel)."""
    return 2 * n * c_out * (c_in // groups) * kernel * kernel * out_side * out_side


@pytest.mark.parametrize("groups", [1, 4])
def test_a_strided_grouped_convolution_and_its_gradients_count_as_three_forward_passes(groups):
    """Forward, input gradient and weight gradient each take the forward's products. JAX writes the input
    gradient of a stride-2 convolution over an input dilated with zeros; those zeros are not work."""
    n, c_in, c_out, side = 2, 8, 16, 16
    x = jnp.ones((n, side, side, c_in))
    w = jnp.ones((3, 3, c_in // groups, c_out))

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=groups)  # fmt: skip
        return jnp.sum(y)

    forward = conv_forward_flops(n, c_in, c_out, groups, 3, side // 2)
    assert function_flops(loss, x, w) == forward
    assert function_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * forward


def test_a_dense_layer_counts_its_multiply_adds():
    x, w = jnp.ones((5, 7)), jnp.ones((7, 3))
    assert function_flops(lambda x, w: jnp.sum(x @ w), x, w) == 2 * 5 * 7 * 3
    assert function_flops(jax.grad(lambda x, w: jnp.sum(x @ w), argnums=(0, 1)), x, w) == 3 * 2 * 5 * 7 * 3


def test_pytorch_counts_a_grouped_weight_gradient_groups_times_over_and_the_correction_removes_that():
    """Why the benchmark corrects PyTorch's counter: the hand count of a grouped convolution's step is three
    forward passes; PyTorch's formula gives the weight gradient `groups` times the products."""
    torch = reference_import("torch")
    from train_bench.peers import step_flops

    n, c_in, c_out, groups, side = 2, 8, 16, 4, 16
    layer = torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, groups=groups, bias=False)
    images = torch.ones(n, c_in, side, side, requires_grad=True)
    forward = conv_forward_flops(n, c_in, c_out, groups, 3, side // 2)

    def model(x):
        return layer(x)[:, :1]  # the shape step_flops's loss takes, (N, 1, H, W)

    masks = torch.zeros(n, 1, side // 2, side // 2)
    assert step_flops(model, images, masks) == 3 * forward
    assert step_flops(model, images, masks, corrected=False) == (2 + groups) * forward


@pytest.mark.parametrize("encoder", ["resnet50", "se_resnext50_32x4d"])
def test_the_train_steps_count_equals_pytorchs_on_the_same_smp_model(encoder):
    """The project's whole train step (its default model config: classification head on, as smp's aux_params;
    BCE + Dice; Adam) at 64², batch 2, against smp.Unet's forward and backward under FlopCounterMode."""
    torch = reference_import("torch")
    smp = reference_import("segmentation_models_pytorch")
    from siim_jax.configs import defaults
    from train_bench.measure import BCE_DICE
    from train_bench.peers import step_flops

    from siim_jax import sharding as sharding_lib
    from siim_jax.models import build_model, build_unfilled
    from siim_jax.training import optim
    from siim_jax.training.losses import make_loss
    from siim_jax.training.state import ModelDef, build_train_state, make_train_step

    config = defaults.default_config()
    config.model.encoder = encoder
    assert config.model.cls_head  # the default: the count includes the head's dense layer
    optimizer = optim.build_optimizer(config.optim)
    # Shapes only: the count needs no parameter values, and random initialisation is slow to compile on a CPU.
    model_def, _, _ = ModelDef.split(build_unfilled(config.model))
    state = jax.eval_shape(lambda: build_train_state(build_model(config.model), optimizer, seed=0, ema=False)[1])
    step = make_train_step(model_def, make_loss(BCE_DICE), optimizer, optim.make_schedule(config.optim, 10),
                           sharding_lib.data_mesh())  # fmt: skip
    batch = {"image": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE), jnp.uint8),
             "mask": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE), jnp.uint8),
             "positive": jax.ShapeDtypeStruct((BATCH,), jnp.float32)}  # fmt: skip
    jax_flops = function_flops(step, state, batch)

    with torch.device("meta"):
        reference = smp.Unet(encoder, encoder_weights=None, classes=1, aux_params={"classes": 1, "dropout": 0.2})
        images, masks = torch.empty(BATCH, 3, SIZE, SIZE), torch.empty(BATCH, 1, SIZE, SIZE)

    def segmentation(x):
        return reference(x)[0]

    assert jax_flops == step_flops(segmentation, images, masks)
    uncorrected = step_flops(segmentation, images, masks, corrected=False)
    if encoder == "resnet50":  # no grouped convolution: PyTorch's own formula is right
        assert uncorrected == jax_flops
    else:  # the 32-group 3x3 convolutions' weight gradients, counted 32 times over by PyTorch
        assert uncorrected > 1.2 * jax_flops
