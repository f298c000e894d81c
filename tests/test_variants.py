"""The speed variants of issue 22 against the baseline they replace, and against PyTorch where it defines the answer.

- model.maxpool="slices": PyTorch's max_pool2d forward and backward on inputs full of ties (exactly: integer
  gradients sum without rounding), for torchvision's padded pool and Cadene's ceil_mode pool.
- model.norm="fused": the one-pass statistics within their stated bound (`layers.one_pass_statistics`), against
  float64 and PyTorch's running statistics; the custom VJP against finite differences.
- every model variant (and all of them together, with remat): a small UNet's train-mode outputs, BatchNorm
  statistics, gradients, one Adam step and eval outputs against the baseline: in float64 within float64
  round-off (the variants are the same function), in float32 and bfloat16 within a factor of the baseline's own
  measured round-off (their rounding differs).
- optim.flatten: the train step's grad_norm and update against the unflattened one.
- fewer kernels and reductions in the optimised HLO (tools/hlo_counts.py), as a relation.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from flax import nnx
from siim_jax.configs.defaults import default_config, default_model_config

from siim_jax import sharding as sharding_lib
from siim_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from siim_jax.models import SegOutput, build_model, stem
from siim_jax.models.layers import BatchNorm, conv, max_pool_3x3_s2, norm_act_train, one_pass_statistics
from siim_jax.models.resnet import _SE_RESNEXT, ENCODERS, BasicBlock, EncoderSpec
from siim_jax.training import optim
from siim_jax.training.losses import make_loss
from siim_jax.training.state import ModelDef, build_train_state, make_train_step
from tests.conftest import reference_import
from tests.tiny_model import TinySegmenter, random_batch
from tools.hlo_counts import hlo_counts

torch = reference_import("torch")

from tests.parity_utils import (  # noqa: E402
    EVAL_ROUND_OFF_FACTOR,
    FLOAT64_BOUND,
    Check,
    elementwise_difference,
    report,
    scaled_difference,
)

F32_EPS = float(np.finfo(np.float32).eps) / 2  # unit round-off u = 2^-24


# ---------------------------------------------------------------------------------------------------------------
# max pool: PyTorch's tie rule


def test_torch_max_pool_backward_takes_the_first_maximum():
    """The rule the slices follow: PyTorch's CPU max-pool keeps a value only when strictly greater, scanning each
    window row by row, so all of a tied window's gradient goes to its first entry in that order."""
    x = torch.zeros((1, 1, 3, 3), requires_grad=True)
    torch.nn.functional.max_pool2d(x, 3, 1).sum().backward()
    assert x.grad.flatten().tolist() == [1.0] + [0.0] * 8
    x = torch.tensor([[[[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]], requires_grad=True)
    torch.nn.functional.max_pool2d(x, 3, 1).sum().backward()
    assert x.grad.flatten().tolist() == [0.0, 1.0] + [0.0] * 7


@pytest.mark.parametrize("impl", ["reduce_window", "slices"])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["padded", "ceil_mode"])
@pytest.mark.parametrize("size", [(9, 12), (10, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_max_pool_equals_torch_with_ties(impl, ceil_mode, size):
    """Forward and backward equal PyTorch's exactly on values drawn from {0, 1, 2} (most windows tie). The
    cotangent is integer-valued, so the gradient's sums (an entry can win up to four windows) are exact in any
    order: any difference is a tie broken differently. A running maximum that keeps the LAST maximum ('>=')
    fails this on hundreds of entries."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=(2, *size, 4)).astype(np.float32)
    pooled = lambda v: max_pool_3x3_s2(v, ceil_mode=ceil_mode, impl=impl)  # noqa: E731
    ours, vjp = jax.vjp(pooled, jnp.asarray(x))
    cotangent = rng.integers(-8, 9, size=ours.shape).astype(np.float32)
    (grad,) = vjp(jnp.asarray(cotangent))

    reference_x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    padding = 0 if ceil_mode else 1
    reference = torch.nn.functional.max_pool2d(reference_x, 3, 2, padding, ceil_mode=ceil_mode)
    reference.backward(torch.from_numpy(cotangent.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(ours), reference.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(grad), reference_x.grad.numpy().transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------------------------
# fused BatchNorm: one-pass statistics and the custom VJP


def variance_bound(count: int, var: np.ndarray, offset: np.ndarray, u: float = F32_EPS) -> np.ndarray:
    """`one_pass_statistics`'s bound |Δvar| ≤ (γ_k + 2u)(2 var + 3 d²), with k = count - 1 (a sequential sum: the
    deepest reduction tree there is, so it holds whatever order XLA sums in)."""
    return (_gamma(count, u) + 2 * u) * (2 * var + 3 * np.square(offset))


def mean_bound(x: np.ndarray, shift: np.ndarray, u: float = F32_EPS) -> np.ndarray:
    """|Δmean| ≤ (γ_k + 2u) E|x - K| + u |K|: the shifted sum's rounding, the division, adding the shift back."""
    return (_gamma(x.size // x.shape[-1], u) + 2 * u) * np.abs(x - shift).mean((0, 1, 2)) + u * np.abs(shift)


def _gamma(count: int, u: float) -> float:
    k = count - 1
    return k * u / (1 - k * u)


def _offset_channels(seed: int, offsets_over_std: np.ndarray, shape=(4, 8, 8)) -> np.ndarray:
    """float32 NHWC activations, one channel per entry of `offsets_over_std` (mean / std), std 1."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((*shape, offsets_over_std.size)) + offsets_over_std).astype(np.float32)


RATIOS = np.array([0.0, 1.0, 10.0, 100.0, 1000.0])  # mean / std: d² / var up to 1e6 at shift 0


@pytest.mark.parametrize("shifted", [False, True], ids=["shift_zero", "shift_near_mean"])
def test_one_pass_variance_within_its_bound(shifted):
    """float32 one-pass statistics against float64's exact ones, each channel within the stated bound, with the
    shift at 0 (the first step) and near the batch mean (a tracking running mean, d² / var ~ 1e-2).
    Accumulating in bfloat16 (the upcast forgotten) exceeds the float32 bound 18 to 110 times."""
    x = _offset_channels(0, RATIOS)
    exact_mean, exact_var = x.astype(np.float64).mean((0, 1, 2)), x.astype(np.float64).var((0, 1, 2))
    shift = (exact_mean + (0.1 if shifted else -exact_mean)).astype(np.float32)
    mean, var = (np.asarray(a, np.float64) for a in one_pass_statistics(jnp.asarray(x), jnp.asarray(shift)))
    bound = variance_bound(x.size // x.shape[-1], exact_var, exact_mean - shift)
    error = np.abs(var - exact_var)
    print(f"\nvariance error / bound per channel (mean/std {RATIOS.tolist()}): {(error / bound).round(4).tolist()}")
    assert (error <= bound).all(), (error, bound)
    assert (np.abs(mean - exact_mean) <= mean_bound(x.astype(np.float64), shift)).all()

    _, broken = one_pass_statistics(jnp.asarray(x, jnp.bfloat16), jnp.asarray(shift, jnp.bfloat16))
    broken_error = np.abs(np.asarray(broken, np.float64) - exact_var)
    # Where the bound is tight enough to mean something (mean/std <= 10; beyond, the worst case k = n - 1 is loose).
    assert (broken_error[:3] > 10 * bound[:3]).all(), (broken_error, bound)


def test_fused_running_statistics_equal_torch():
    """After one train-mode call, the fused BatchNorm's running mean and variance (momentum 0.1, unbiased) against
    PyTorch's BatchNorm2d run in float64 on the same input, within the variance bound carried through
    (1 - momentum) * n / (n - 1), plus float32 round-off of the update; the mean likewise."""
    x = _offset_channels(1, RATIOS[:4])
    norm = BatchNorm(x.shape[-1], dtype=jnp.float32, norm="fused")
    norm(jnp.asarray(x), use_running_average=False)
    reference = torch.nn.BatchNorm2d(x.shape[-1], momentum=0.1).double().train()
    reference(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64)))
    count = x.size // x.shape[-1]
    exact_mean, exact_var = (reference.running_mean.numpy() / 0.1, x.astype(np.float64).var((0, 1, 2)))
    bound = 0.1 * count / (count - 1) * variance_bound(count, exact_var, exact_mean) + 4 * F32_EPS * (0.9 + exact_var)
    mean_error = np.abs(np.asarray(norm.mean[...], np.float64) - reference.running_mean.numpy())
    assert (mean_error <= 0.1 * mean_bound(x.astype(np.float64), 0.0) + 2 * F32_EPS * np.abs(exact_mean)).all()
    assert (np.abs(np.asarray(norm.var[...], np.float64) - reference.running_var.numpy()) <= bound).all()


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_act_vjp_matches_finite_differences(relu, with_residual):
    """The hand-written backward (x, residual, scale, bias) against central differences of the forward, float64."""
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 3, 4, 5)) + 2.0)
        residual = jnp.asarray(rng.standard_normal(x.shape)) if with_residual else None
        scale, bias = jnp.asarray(rng.random(5) + 0.5), jnp.asarray(rng.standard_normal(5))
        shift = jnp.asarray(rng.standard_normal(5))

        def output(x, residual, scale, bias):
            return norm_act_train(x, residual, scale, bias, shift, 1e-5, relu, jnp.float64)[0]

        jax.test_util.check_grads(output, (x, residual, scale, bias), order=1, modes=["rev"])


# ---------------------------------------------------------------------------------------------------------------
# model variants against the baseline

TINY_ENCODERS = {
    "tiny_resnet": EncoderSpec(BasicBlock, (1, 1, 1, 1)),
    "tiny_se_resnext": EncoderSpec(layers=(1, 1, 1, 1), ceil_mode_pool=True, **_SE_RESNEXT),  # Cadene's pool
}
VARIANTS = {
    "norm_fused": {"norm": "fused"},
    "stem_pad4": {"stem": "pad4"},
    "stem_grey": {"stem": "grey"},
    "maxpool_slices": {"maxpool": "slices"},
    "all_remat": {"norm": "fused", "stem": "grey", "maxpool": "slices", "remat": True},
}
INPUT_SHAPE = (2, 64, 96)  # grey N, H, W; non-square
ADAM = default_config().optim


@pytest.fixture(autouse=True)
def tiny_encoders(monkeypatch):
    for name, spec in TINY_ENCODERS.items():
        monkeypatch.setitem(ENCODERS, name, spec)


def _model_config(encoder: str, dtype: str, variant: dict):
    config = default_model_config()
    config.update({"encoder": encoder, "dtype": dtype, "decoder_channels": (16, 16, 16, 16, 16), "cls_dropout": 0.0})
    config.encoder_only = encoder == "tiny_se_resnext"  # the SE block and Cadene's pool; the decoder is shared
    config.update(variant)
    return config


def _grey_input(dtype) -> jax.Array:
    """Replicated grey images as `augment.model_input` makes them, x_c = (g - m_c) / s_c, g = k / 255, computed in
    float64 from the float32 constants: exactly replicated grey, which the folded stem assumes."""
    grey = np.random.default_rng(3).integers(0, 256, size=(*INPUT_SHAPE, 1)) / 255.0
    mean, std = IMAGENET_MEAN.astype(np.float64), IMAGENET_STD.astype(np.float64)
    return jnp.asarray((grey - mean) / std, dtype)


def _randomise_batchnorm(model: nnx.Module) -> None:
    """Scales, shifts and running statistics away from PyTorch's init (1, 0, 0, 1), the same for every variant
    (they hold the same variables in the same order), so that swapped or ignored ones show."""
    rng = np.random.default_rng(4)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, BatchNorm):
            features = module.scale.shape
            module.scale[...] = jnp.asarray(rng.random(features) + 0.5, jnp.float32)
            module.bias[...] = jnp.asarray(rng.standard_normal(features) * 0.1, jnp.float32)
            module.mean[...] = jnp.asarray(rng.standard_normal(features) * 0.1, jnp.float32)
            module.var[...] = jnp.asarray(rng.random(features) + 0.5, jnp.float32)


@functools.cache
def _variant_run(encoder: str, dtype: str, variant_items: tuple) -> dict[str, list[np.ndarray]]:
    """One train-mode forward and backward, one Adam step of the project's optimizer, one eval forward."""
    config = _model_config(encoder, dtype, dict(variant_items))
    wide = jnp.float64 if dtype == "float64" else jnp.float32  # parameters and inputs
    with jax.enable_x64(dtype == "float64"):
        model = build_model(config, nnx.Rngs(0))
        _randomise_batchnorm(model)
        model_def, params, batch_stats = ModelDef.split(model)
        params, batch_stats = jax.tree.map(lambda a: a.astype(wide), (params, batch_stats))
        x = _grey_input(wide)
        optimizer = optim.build_optimizer(ADAM)

        @jax.jit
        def run(params, batch_stats):
            def loss_fn(params):
                outputs, new_stats = model_def.apply(params, batch_stats, x, train=True, dropout_key=jax.random.key(0))
                outputs = [at_least(o) for o in jax.tree.leaves(outputs)]
                weights = jax.random.split(jax.random.key(1), len(outputs))
                loss = sum((o * jax.random.normal(k, o.shape, o.dtype)).mean() for o, k in zip(outputs, weights))
                return loss, (outputs, new_stats)

            (_, (outputs, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, _ = optimizer.update(grads, optimizer.init(params), params)
            eval_outputs, _ = model_def.apply(params, batch_stats, x, train=False)
            return outputs, new_stats, grads, updates, jax.tree.leaves(eval_outputs)

        outputs, new_stats, grads, updates, eval_outputs = run(params, batch_stats)
        as_list = lambda tree: [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]  # noqa: E731
        return {
            "train-outputs": as_list(outputs),
            "batchnorm-statistics": as_list(new_stats),
            "gradients": as_list(grads),
            "adam-step": as_list(updates),
            "eval-outputs": as_list(eval_outputs),
        }


def at_least(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _run(encoder: str, dtype: str, variant: dict) -> dict[str, list[np.ndarray]]:
    return _variant_run(encoder, dtype, tuple(sorted(variant.items())))


def _worst(ours: dict, reference: dict, measure) -> dict[str, float]:
    """Worst difference per kind over its tensors. The Adam step is compared in gradient units: multiplied by
    (|g| + eps) / lr of the reference's gradient, the first step's divisor (parity_utils._adam_divisors), since
    Adam divides round-off in gradients near zero by eps."""
    divisors = [(np.abs(g) + ADAM.eps) / ADAM.lr for g in reference["gradients"]]
    worst = {}
    for kind in reference:
        pairs = list(zip(ours[kind], reference[kind]))
        if kind == "adam-step":
            pairs = [(a * d, b * d) for (a, b), d in zip(pairs, divisors)]
        assert len(pairs) == len(reference[kind]) > 0
        worst[kind] = max(measure(a, b) for a, b in pairs)
    return worst


@pytest.mark.parametrize("variant", list(VARIANTS), ids=str)
def test_variant_equals_baseline_in_float64(variant):
    """Each variant computes the same function as the baseline: in float64 every entry of every output,
    statistic, gradient and Adam step agrees to FLOAT64_BOUND (parity_utils: entries down to 1e-2 of their
    tensor's largest to 1e-9 of their own size), whereas a real difference (a border left unfolded, a variance
    off by n / (n - 1)) is > 1e-3."""
    encoders = ["tiny_resnet", "tiny_se_resnext"] if variant == "all_remat" else ["tiny_resnet"]
    for encoder in encoders:
        measured = _worst(_run(encoder, "float64", VARIANTS[variant]), _run(encoder, "float64", {}),
                          elementwise_difference)  # fmt: skip
        for kind, value in measured.items():
            report(Check(f"{encoder}_{variant}", kind, value, FLOAT64_BOUND))


def test_grey_stem_without_its_border_map_fails(monkeypatch):
    """The folded stem with its offset taken as the interior constant everywhere (the border's partial windows
    ignored) differs from the baseline on the border: the float64 check fails it by orders of magnitude."""
    monkeypatch.setattr(stem, "offset_map", lambda conv, kernel, size: kernel.sum((0, 1, 2)))
    _variant_run.cache_clear()
    try:
        broken = _worst(_run("tiny_resnet", "float64", {"stem": "grey"}), _run("tiny_resnet", "float64", {}),
                        elementwise_difference)  # fmt: skip
    finally:
        _variant_run.cache_clear()
    print(f"\nunfolded border: {broken}")
    assert broken["train-outputs"] > 1e4 * FLOAT64_BOUND


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_all_variants_within_round_off(dtype):
    """All variants together in `dtype` against the float64 baseline, per tensor max|ours - exact| / max|exact|,
    bounded by EVAL_ROUND_OFF_FACTOR times the same measure of the baseline in `dtype`: the variants round in
    other places (one-pass sums, one cast after the residual add, a folded kernel), not more."""
    exact = _run("tiny_resnet", "float64", {})
    baseline = _worst(_run("tiny_resnet", dtype, {}), exact, scaled_difference)
    variant = {key: value for key, value in VARIANTS["all_remat"].items() if key != "remat"}
    measured = _worst(_run("tiny_resnet", dtype, variant), exact, scaled_difference)
    for kind, value in measured.items():
        print(f"\n{dtype} baseline's own drift {kind}: {baseline[kind]:.2e}")
        report(Check(f"tiny_resnet_all_{dtype}", kind, value, EVAL_ROUND_OFF_FACTOR * baseline[kind]))


# ---------------------------------------------------------------------------------------------------------------
# optim.flatten: one norm, one vector


def _tiny_train_step(optim_config, batch):
    """(grad_norm, parameters) after one train step of the tiny model."""
    mesh = sharding_lib.data_mesh()
    optimizer = optim.build_optimizer(optim_config)
    model_def, state = build_train_state(TinySegmenter(dropout=0.0, rngs=nnx.Rngs(0)), optimizer, 0, ema=False)
    step = make_train_step(model_def, make_loss(default_config().loss), optimizer,
                           optim.make_schedule(optim_config, 10), mesh, flatten=optim_config.flatten)  # fmt: skip
    state, metrics = step(sharding_lib.replicate(state, mesh), jax.device_put(batch))
    return float(metrics["grad_norm"]), [np.asarray(a, np.float64) for a in jax.tree.leaves(state.params)]


def test_flattened_step_equals_the_tree_step():
    """With clipping that triggers, the flattened optimizer and its shared norm give the tree step's grad_norm
    and parameters. Bounds: the norm sums the same n squares in another order, relative change ≤ n u; Adam's
    first step lr * c g / (c |g| + eps) changes by at most that relative to lr under the clip factor c, plus a
    few u of elementwise rounding. Clipping lost in the flattened optimizer moves parameters by ~lr and fails."""
    optim_config = copy.deepcopy(default_config().optim)
    optim_config.update({"clip_norm": 1e-3, "lr": 1e-3})
    batch = random_batch(0, 4)
    norm, params = _tiny_train_step(optim_config, batch)
    optim_config.flatten = True
    flat_norm, flat_params = _tiny_train_step(optim_config, batch)
    count = sum(p.size for p in params)
    assert norm > 10 * optim_config.clip_norm  # the clipping acts
    assert abs(flat_norm - norm) <= count * F32_EPS * norm
    step_bound = optim_config.lr * (count + 8) * F32_EPS
    assert max(np.abs(a - b).max() for a, b in zip(flat_params, params)) <= step_bound

    optim_config.clip_norm = 0.0
    _, unclipped = _tiny_train_step(optim_config, batch)
    assert max(np.abs(a - b).max() for a, b in zip(unclipped, params)) > 100 * step_bound


# ---------------------------------------------------------------------------------------------------------------
# kernel counts


class _ResidualNet(nnx.Module):
    """conv → BatchNorm → ReLU → one basic residual block → 1x1 conv: the UNet's interface, compiled in seconds."""

    def __init__(self, norm: str, rngs: nnx.Rngs):
        self.conv = conv(3, 8, 3, dtype=jnp.float32, rngs=rngs)
        self.bn = BatchNorm(8, dtype=jnp.float32, norm=norm)
        self.block = BasicBlock(8, 8, 1, ENCODERS["resnet18"], dtype=jnp.float32, norm=norm, rngs=rngs)
        self.head = conv(8, 1, 1, bias=True, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x, *, train: bool) -> SegOutput:
        h = self.bn(self.conv(x), use_running_average=not train, relu=True)
        return SegOutput(self.head(self.block(h, train=train)), None)


def _step_counts(norm: str, flatten: bool) -> dict[str, int]:
    optim_config = copy.deepcopy(default_config().optim)
    optim_config.update({"clip_norm": 1.0, "flatten": flatten})
    mesh = sharding_lib.data_mesh()
    optimizer = optim.build_optimizer(optim_config)
    model_def, state = build_train_state(_ResidualNet(norm, nnx.Rngs(0)), optimizer, 0, ema=False)
    step = make_train_step(model_def, make_loss(default_config().loss), optimizer,
                           optim.make_schedule(optim_config, 10), mesh, flatten=flatten)  # fmt: skip
    batch = {key: value for key, value in random_batch(0, 2).items()}
    return hlo_counts(step.lower(state, batch).compile().as_text())


def test_variants_take_fewer_kernels():
    """In the optimised HLO of a train step (three BatchNorms, one residual add, clipping on):
    - fused BatchNorm: fewer reduction kernels (mean and variance in one pass instead of two; the backward's
      two sums from one read) and fewer kernels (normalisation, residual, ReLU and cast in one);
    - flatten: fewer reduction kernels (the global norm on one vector, shared by clipping and the log, instead
      of one per parameter) and fewer kernels (the update on one vector)."""
    baseline = _step_counts("flax", flatten=False)
    fused = _step_counts("fused", flatten=False)
    flat = _step_counts("flax", flatten=True)
    print(f"\nbaseline {baseline}\nbn_fused {fused}\none_norm {flat}")
    assert fused["reductions"] < baseline["reductions"] and fused["kernels"] < baseline["kernels"]
    assert flat["reductions"] < baseline["reductions"] and flat["kernels"] < baseline["kernels"]


def test_unknown_variant_names_fail_clearly():
    for key, message in (("norm", "model.norm"), ("stem", "model.stem"), ("maxpool", "model.maxpool")):
        with pytest.raises(ValueError, match=message):
            model = build_model(_model_config("tiny_resnet", "float32", {key: "typo"}), nnx.Rngs(0))
            model(jnp.zeros((1, 64, 64, 3)), train=False)
