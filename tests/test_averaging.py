"""Checkpoint averaging: BatchNorm statistics recomputed for averaged weights, against a hand computation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from siim_jax.models.layers import BatchNorm
from siim_jax.training.averaging import batch_stats_agree, mean_of, recompute_batch_stats

EPSILON = 1e-5


class TwoNorms(nnx.Module):
    """Linear → BatchNorm → ReLU → Linear → BatchNorm: the second layer's input depends on how the first normalises."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(3, 4, rngs=rngs)
        self.bn1 = BatchNorm(4, dtype=jnp.float32, epsilon=EPSILON)
        self.linear2 = nnx.Linear(4, 2, rngs=rngs)
        self.bn2 = BatchNorm(2, dtype=jnp.float32, epsilon=EPSILON)

    def __call__(self, x, *, train: bool):
        h = nnx.relu(self.bn1(self.linear1(x), use_running_average=not train))
        return self.bn2(self.linear2(h), use_running_average=not train)


def reference_statistics(model: TwoNorms, batches) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(mean, var)] of each BatchNorm, in float64: the plain mean over the batches of each batch's mean and unbiased
    variance, every layer normalising with its batch's biased variance (train mode) — what
    torch.optim.swa_utils.update_bn computes with its cumulative average (momentum=None)."""

    def weights(linear):
        return np.asarray(linear.kernel[...], np.float64), np.asarray(linear.bias[...], np.float64)

    per_batch = []
    for x in batches:
        kernel, bias = weights(model.linear1)
        a1 = np.asarray(x, np.float64) @ kernel + bias
        normalised = (a1 - a1.mean(0)) / np.sqrt(a1.var(0) + EPSILON)
        h = np.maximum(normalised * np.asarray(model.bn1.scale[...]) + np.asarray(model.bn1.bias[...]), 0.0)
        kernel, bias = weights(model.linear2)
        a2 = h @ kernel + bias
        per_batch.append([(a.mean(0), a.var(0, ddof=1)) for a in (a1, a2)])
    return [tuple(np.mean([batch[layer][k] for batch in per_batch], axis=0) for k in range(2)) for layer in range(2)]


def test_recomputed_batch_statistics_are_the_mean_over_batches():
    model = TwoNorms(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=2.0, scale=3.0, size=(size, 3)).astype(np.float32) for size in (8, 8, 5)]
    expected = reference_statistics(model, batches)
    params_before = nnx.state(model, nnx.Param)

    assert recompute_batch_stats(model, batches) == 3

    for norm, (mean, var) in zip((model.bn1, model.bn2), expected):
        # float32 activations of O(10) against float64: relative round-off ~1e-6
        np.testing.assert_allclose(norm.mean[...], mean, rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(norm.var[...], var, rtol=2e-5, atol=1e-5)
        assert norm.momentum == 0.9  # restored
    assert batch_stats_agree([params_before, nnx.state(model, nnx.Param)])  # the weights are untouched


def test_mean_of_trees_and_agreement():
    trees = [{"a": np.array([1.0, 2.0]), "b": np.array(3.0)}, {"a": np.array([3.0, 6.0]), "b": np.array(5.0)}]
    mean = mean_of(trees)
    np.testing.assert_array_equal(mean["a"], [2.0, 4.0])
    assert mean["b"] == 4.0
    assert batch_stats_agree([trees[0], trees[0]]) and not batch_stats_agree(trees)
