"""Trains TinySegmenter for a few steps on a data-parallel mesh and saves the final parameters.

    python tests/multihost_worker.py OUT.npz --devices N [--accum K ...]
        one process with N CPU devices, one run per K (micro-batches per step)
    python tests/multihost_worker.py OUT.npz --devices N --coordinator HOST:PORT --processes P --process-id I
        process I of P, each with N CPU devices; every process feeds only its rows of each global batch

Each process writes OUT.npz with the initial parameters ('initial...') and its own copy of the final replicated
ones of each run ('accumK/final...'); process I of several adds `.I` to the name.
Run by test_sharding.py and test_multihost.py in fresh interpreters: the device count is fixed at JAX start-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GLOBAL_BATCH = 16
STEPS = 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--accum", type=int, nargs="+", default=[1], help="one run per micro-batch count")
    parser.add_argument("--coordinator")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from siim_jax import sharding

    sharding.initialise_distributed(args.coordinator, args.processes if args.coordinator else None,
                                    args.process_id if args.coordinator else None)
    import numpy as np

    results = {}
    for accum in args.accum:
        initial, final = train(accum)
        results.update(initial)
        results.update({f"accum{accum}/{name}": value for name, value in final.items()})
    out = args.out if args.processes == 1 else args.out.with_suffix(f".{args.process_id}.npz")
    np.savez(out, **results)


def train(accum: int) -> tuple[dict, dict]:
    """(initial, final) parameters of STEPS steps with `accum` micro-batches, on a mesh of every device."""
    import jax
    from flax import nnx

    from siim_jax import losses, optim, sharding
    from siim_jax.configs import defaults
    from siim_jax.train_state import build_train_state, make_train_step
    from tests.tiny_model import TinySegmenter, random_batch

    mesh = sharding.data_mesh()
    config = defaults.default_optim_config()
    config.lr = 0.05
    optimizer = optim.build_optimizer(config)
    model_def, state = build_train_state(TinySegmenter(rngs=nnx.Rngs(0)), optimizer, seed=0, ema=False)
    initial = flat_params(state.params, "initial")
    state = sharding.replicate(state, mesh)
    step = make_train_step(
        model_def, losses.make_loss({"cls_weight": 0.5}), optimizer, optim.make_schedule(config, STEPS), mesh,
        grad_accum=accum,
    )
    rows = sharding.local_batch_size(GLOBAL_BATCH, mesh)
    start = jax.process_index() * rows
    for index in range(STEPS):
        batch = random_batch(index, GLOBAL_BATCH)
        local = {name: value[start : start + rows] for name, value in batch.items()}  # this process's rows
        global_batch = {
            name: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), values)
            for name, values in local.items()
        }
        state, _ = step(state, global_batch)
    return initial, flat_params(state.params, "final")


def flat_params(params, prefix: str) -> dict:
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


if __name__ == "__main__":
    main()
