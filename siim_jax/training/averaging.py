"""Checkpoint averaging: the mean of several steps' weights, and BatchNorm statistics recomputed for that mean.

The running statistics of each checkpoint describe the activations of its own weights; averaged weights produce
other activations, so their statistics are measured afresh, as SWA does (Izmailov et al. 2018;
`torch.optim.swa_utils.update_bn`): one pass over training batches in train mode, every BatchNorm normalising with
its batch's statistics, and the running statistics set to the plain mean over the batches of each batch's mean
and unbiased variance (update_bn's `momentum=None`, a cumulative average). `restore_for_inference` does this only
on request (`bn_statistics='recompute'`); by default it averages the steps' running statistics with the weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from siim_jax.models.layers import BatchNorm


def mean_of(trees: list):
    """The leaf-wise mean of pytrees of the same structure."""
    return jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *trees)


def batch_stats_agree(trees: list) -> bool:
    """Whether every tree's batch statistics equal the first's (then their mean needs no recomputing)."""
    first = jax.tree.leaves(trees[0])
    return all(all(np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(tree))) for tree in trees[1:])


@nnx.jit
def _train_mode_call(model: nnx.Module, images: jax.Array) -> None:
    model(images, train=True)


def recompute_batch_stats(model: nnx.Module, image_batches: Iterable[np.ndarray]) -> int:
    """Sets every BatchNorm's running mean and variance of `model` to their mean over `image_batches` (model
    inputs, NHWC) of each batch's statistics in train mode; returns the number of batches.

    With momentum 0 a train-mode call leaves each layer's running statistics equal to its batch's, which are summed
    and divided by the count. Dropout is drawn from the model's RNG streams and does not reach a BatchNorm here.
    """
    norms = [module for _, module in nnx.iter_modules(model) if isinstance(module, BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    totals, count = None, 0
    try:
        for images in image_batches:
            _train_mode_call(model, jnp.asarray(images))
            stats = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))  # the model's own change in place
            totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
            count += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    if count == 0:
        raise ValueError("no batch to recompute the BatchNorm statistics on")
    nnx.update(model, jax.tree.map(lambda total: total / count, totals))
    return count
