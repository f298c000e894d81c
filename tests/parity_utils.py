"""Runs a PyTorch reference and its converted Flax twin side by side and measures how far they drift.

Every comparison is the worst, over tensors, of max|ours - reference| / max|reference| (relative to the tensor's
scale, so entries near zero do not blow it up); tests print it as `PARITY <check> <case>: <value>`.

The reference is the PyTorch model run in float64.
- eval outputs: our model in float32, as converted.
- train mode (first forward's outputs and updated BatchNorm statistics, gradients, three Adam steps): float64 on
  both sides. Float32 cannot resolve them to 1e-4: PyTorch's own float32 train-mode forward of a random
  ResNet-50 misses its float64 one by 1.5e-4, and a train-mode BatchNorm passes back a gradient that sums to
  zero over the batch, so the parameter gradients upstream of it come out of that cancellation with ~1e-2
  relative round-off (PyTorch's float32 against its float64 as much as ours); Adam then turns such near-zero
  gradients into ±lr steps.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from siim_jax.convert import Rule, conversion_plan, load_into_model, load_state_dict, translate
from siim_jax.models import build_unfilled
from tests.conftest import reference_import

torch = reference_import("torch")

TOLERANCE = 1e-4
INPUT_SHAPE = (2, 3, 64, 96)  # NCHW; non-square so that H/W mix-ups show
LEARNING_RATE = 1e-3
ADAM_STEPS = 3


def nchw_to_nhwc(array: np.ndarray) -> np.ndarray:
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def relative_difference(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-30))


def worst_output_difference(ours: list, reference: list[np.ndarray]) -> float:
    assert len(ours) == len(reference)
    return max(relative_difference(a, nchw_to_nhwc(b)) for a, b in zip(ours, reference))


def worst_state_difference(ours: nnx.State, reference: dict[str, np.ndarray], rules: tuple[Rule, ...]) -> float:
    """A Flax state against PyTorch tensors of the same names, paired by the converter's rules."""
    mapped, unmatched = translate(reference, rules)
    assert not unmatched, unmatched
    flat = {path: variable.get_value() for path, variable in nnx.to_flat_state(ours)}
    assert set(flat) == set(mapped), set(flat) ^ set(mapped)
    return max(relative_difference(flat[path], array) for path, (_, array) in mapped.items())


def report(check: str, case: str, value: float) -> None:
    print(f"\nPARITY {check} {case}: {value:.2e}")
    assert value < TOLERANCE, f"{check} {case}: {value:.2e}"


def calibrate_batchnorm(model, seed: int = 0):
    """Random BatchNorm scales and shifts, and running statistics measured on a random batch.

    PyTorch's init (1, 0, 0, 1) would hide swapped or mis-scaled statistics; statistics that fit the activations
    keep a deep random network well-conditioned in eval mode, as a trained one is (otherwise activations grow
    into the thousands and float32 round-off alone exceeds the tolerance, in PyTorch as much as here).
    """
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator) * 0.1)
            norm.reset_running_stats()
            norm.momentum = None  # a plain average over the calibration batch
        model.train()(torch.randn(INPUT_SHAPE, generator=generator))
        for norm in norms:
            norm.momentum = 0.1
    return model.eval()


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make_torch: Callable  # () -> torch.nn.Module with random weights
    forward: Callable  # (torch model, NCHW tensor) -> tensors in the order the Flax model returns them
    source: str
    arch: str


def _as_list(outputs) -> list:
    """Our model's outputs in the reference's order: an encoder's features, or a `SegOutput`'s logits (the mask
    logits alone without a classification head)."""
    return [output for output in outputs if output is not None]


def _numpy(tensors) -> list[np.ndarray]:
    return [t.detach().numpy().copy() for t in tensors]



def _running_stats(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items() if "running_" in k}


class CaseRun:
    """One case's models and comparisons, each computed once and shared by the tests that read it.

    The reference is always the PyTorch model in float64, i.e. the exact result: comparing with its float32 run
    would add PyTorch's own round-off (as large as ours) to every difference.
    """

    def __init__(self, case: Case):
        self.case = case
        torch_model = case.make_torch()
        self.model_config, self.rules, self.state_dict = conversion_plan(
            load_state_dict(torch_model.state_dict()), case.source, case.arch
        )
        # Our config's default head dropout vs smp's 0 here: random masks cannot match across frameworks.
        self.model_config.cls_dropout = 0.0
        self.reference_model = torch_model.double()
        rng = np.random.default_rng(0)
        self.inputs = [rng.standard_normal(INPUT_SHAPE) for _ in range(ADAM_STEPS)]

    def flax_model(self, dtype: str) -> nnx.Module:
        """The converted model computing in `dtype`; float64 (under `jax.enable_x64`) also widens its weights."""
        config = copy.deepcopy(self.model_config)
        config.dtype = dtype
        model = build_unfilled(config)
        load_into_model(model, self.state_dict, self.rules)
        weights = nnx.state(model, (nnx.Param, nnx.BatchStat))
        nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.dtype(dtype)), weights))
        return model

    def reference_forward(self, model, x: np.ndarray) -> list:
        return self.case.forward(model, torch.from_numpy(x))

    @functools.cached_property
    def reference_eval_outputs(self) -> list[np.ndarray]:
        with torch.no_grad():
            return _numpy(self.reference_forward(self.reference_model.eval(), self.inputs[0]))

    @functools.cached_property
    def eval_difference(self) -> float:
        """Our float32 eval-mode outputs."""
        model = self.flax_model("float32")
        x = jnp.asarray(nchw_to_nhwc(self.inputs[0]), jnp.float32)
        ours = _as_list(jax.jit(lambda m, x: m(x, train=False))(model, x))
        return worst_output_difference(ours, self.reference_eval_outputs)

    @functools.cached_property
    def training_differences(self) -> dict[str, float]:
        """ADAM_STEPS Adam steps in float64 on both sides (see the module docstring for why not float32)."""
        with jax.enable_x64(True):
            rng = np.random.default_rng(1)
            # The loss is sum_i mean(output_i * weight_i), one fixed random array per output.
            weights = [rng.standard_normal(out.shape) for out in self.reference_eval_outputs]
            reference, ours = self._torch_training(weights), self._flax_training(weights)
            first_outputs = worst_output_difference(ours["first_outputs"], reference["first_outputs"])
            differences = {"train-outputs": first_outputs}
            for key in ("batchnorm-statistics", "gradients", "adam-steps"):
                differences[key] = worst_state_difference(ours[key], reference[key], self.rules)
            return differences

    def _torch_training(self, weights) -> dict:
        model = copy.deepcopy(self.reference_model).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        trace = {}
        for x in self.inputs:
            optimizer.zero_grad()
            outputs = self.reference_forward(model, x)
            sum((out * torch.from_numpy(w)).mean() for out, w in zip(outputs, weights)).backward()
            if not trace:
                trace["first_outputs"] = _numpy(outputs)
                trace["batchnorm-statistics"] = _running_stats(model)
                # smp's never-called last-block attention1 gets no gradient; the converter drops it anyway.
                grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
                trace["gradients"] = grads
            optimizer.step()
        trace["adam-steps"] = {k: v.numpy().copy() for k, v in model.state_dict().items()}
        return trace

    def _flax_training(self, weights) -> dict:
        """The same steps through a plain `jax.jit` over `nnx.split` state, as training runs them."""
        model = self.flax_model("float64")
        graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        optimizer = optax.adam(LEARNING_RATE)
        nhwc_weights = [jnp.asarray(nchw_to_nhwc(w)) for w in weights]

        @jax.jit
        def step(params, batch_stats, opt_state, x):
            # Merged with fresh Variables (copy=True) inside the differentiated function: BatchNorm may only
            # update statistics that belong to the current trace.
            def loss_fn(params, batch_stats):
                module = nnx.merge(graphdef, params, batch_stats, rest, copy=True)
                outputs = _as_list(module(x, train=True))
                loss = sum((out * w).mean() for out, w in zip(outputs, nhwc_weights))
                return loss, (outputs, nnx.state(module, nnx.BatchStat))

            (_, (outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return outputs, grads, optax.apply_updates(params, updates), batch_stats, opt_state

        opt_state = optimizer.init(params)
        trace = {}
        for x in self.inputs:
            outputs, grads, params, batch_stats, opt_state = step(
                params, batch_stats, opt_state, jnp.asarray(nchw_to_nhwc(x))
            )
            if not trace:
                trace = {"first_outputs": outputs, "batchnorm-statistics": batch_stats, "gradients": grads}
        nnx.update(model, params, batch_stats)
        trace["adam-steps"] = nnx.state(model, (nnx.Param, nnx.BatchStat))
        return trace


@functools.lru_cache(maxsize=1)  # a float64 case holds GBs; tests run case by case
def run_case(case: Case) -> CaseRun:
    return CaseRun(case)
