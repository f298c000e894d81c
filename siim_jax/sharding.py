"""Data parallelism over every device of every process: one mesh axis, batches split along it, state replicated.

Under `jax.jit` with these shardings XLA inserts the gradient all-reduce itself, and BatchNorm's batch mean over a
batch-sharded array is the global mean, so BN is synchronised across devices with no axis name.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialise_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins a multi-process run before JAX is used; returns whether one was joined.

    Explicit arguments win; otherwise a SLURM job with more than one task is detected from its environment
    (`jax.distributed.initialize` reads the coordinator and ranks from it). A single process does nothing.
    """
    if coordinator_address is not None:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize()
        return True
    return False


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: all devices of all processes).

    The axis is Auto (XLA propagates shardings from the jit boundaries), not Explicit: the steps only pin their
    inputs and outputs.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across the mesh, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of a global batch; the global batch must split evenly over the devices."""
    if global_batch_size % mesh.size:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {mesh.size} devices")
    return global_batch_size * len(mesh.local_devices) // mesh.size


def replicate(tree, mesh: Mesh):
    """Copies a pytree of host values (identical on every process) to every device."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def restore_target(tree, mesh: Mesh | None = None):
    """What to restore a checkpoint of `tree` into: its arrays' shapes and dtypes, replicated over `mesh` (default:
    every device of this run). Every checkpoint restore builds its target here.

    Orbax places each restored array as its target says. Given none, it rebuilds the sharding saved in the
    checkpoint, naming the saving process's devices, and fails ("Topology mismatch") where those do not exist: a
    model converted on a laptop and loaded on a GPU, a state saved from device 1 and loaded with one device.
    """
    sharding = replicated(data_mesh() if mesh is None else mesh)
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), tree)
