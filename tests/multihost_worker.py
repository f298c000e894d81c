"""Runs the train step of TinySegmenter on data-parallel meshes and saves what it did.

    python tests/multihost_worker.py OUT.npz --devices N [--meshes M ...] [--accum K ...]
        one process with N CPU devices; runs on each mesh (of the first M devices; default all N)
    python tests/multihost_worker.py OUT.npz --devices N [--accum K ...] --coordinator HOST:PORT --processes P \
            --process-id I
        process I of P, each with N CPU devices, on one mesh of every device; every process feeds only its
        rows of each global batch

For each mesh of M devices, OUT.npz holds this process's copy of
    'meshM/accumK/final...'     the parameters after STEPS Adam steps with K micro-batches per step, for each
                                K of --accum (default 1),
    'meshM/accumG/gradient...'  the gradient the train step applies to the first batch, for each G of
                                GRADIENT_ACCUMS,
and 'initial...', the parameters at step 0. A single process also saves 'accumG/reference...', the gradient
of the same batch computed one micro-batch after another on one device without sharding (`reference_gradient`).
Process I of several adds `.I` to the file name.
Run by test_sharding.py and test_sharding_multihost.py in fresh interpreters: the device count is fixed at JAX
start-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GLOBAL_BATCH = 32  # splits into 4 micro-batches of one row per device on 8 devices
STEPS = 2
GRADIENT_ACCUMS = (1, 2, 4)
LOSS_CONFIG = {"cls_weight": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--meshes", type=int, nargs="+", help="one run per mesh of this many devices")
    parser.add_argument("--accum", type=int, nargs="+", default=[1], help="micro-batch counts of the Adam runs")
    parser.add_argument("--coordinator")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flax import nnx

    from siim_jax import sharding
    from tests.tiny_model import TinySegmenter, random_batch

    sharding.initialise_distributed(args.coordinator, args.processes if args.coordinator else None,
                                    args.process_id if args.coordinator else None)
    import numpy as np

    if args.meshes and args.processes > 1:
        parser.error("--meshes is for a single process; several processes share one mesh of every device")
    meshes = [sharding.data_mesh(jax.devices()[:size]) for size in args.meshes or [len(jax.devices())]]
    batches = [random_batch(index, GLOBAL_BATCH) for index in range(STEPS)]
    results = {}
    for mesh in meshes:
        for accum in args.accum:
            initial, final = train(accum, mesh, batches)
            results.update(initial)
            results.update(prefixed(f"mesh{mesh.size}/accum{accum}/final", final))
        for accum in GRADIENT_ACCUMS:
            gradient = step_gradient(TinySegmenter(dropout=0.0, rngs=nnx.Rngs(0)), accum, mesh, batches[0])
            results.update(prefixed(f"mesh{mesh.size}/accum{accum}/gradient", gradient))
    if args.processes == 1:
        for accum in GRADIENT_ACCUMS:
            results.update(prefixed(f"accum{accum}/reference", reference_gradient(accum, batches[0])))
    out = args.out if args.processes == 1 else args.out.with_suffix(f".{args.process_id}.npz")
    np.savez(out, **results)


def train(accum: int, mesh, batches: list[dict]) -> tuple[dict, dict]:
    """(initial, final) parameters of one Adam step per batch with `accum` micro-batches."""
    from flax import nnx
    from siim_jax.configs import defaults

    from siim_jax import sharding
    from siim_jax.training import losses, optim
    from siim_jax.training.state import build_train_state, make_train_step
    from tests.tiny_model import TinySegmenter

    config = defaults.default_optim_config()
    config.lr = 0.05
    optimizer = optim.build_optimizer(config)
    model_def, state = build_train_state(TinySegmenter(rngs=nnx.Rngs(0)), optimizer, seed=0, ema=False)
    initial = prefixed("initial", flat_params(state.params))
    step = make_train_step(
        model_def, losses.make_loss(LOSS_CONFIG), optimizer, optim.make_schedule(config, STEPS), mesh,
        grad_accum=accum,
    )
    state = sharding.replicate(state, mesh)
    for batch in batches:
        state, _ = step(state, global_batch(batch, mesh))
    return initial, flat_params(state.params)


def step_gradient(model, accum: int, mesh, batch: dict) -> dict:
    """The gradient that one train step of `model` on `mesh` hands its optimizer, `batch` being the global batch.

    The optimizer is SGD at momentum 0, whose trace after a step is exactly the gradient it was given: unlike
    Adam's update, it keeps the gradient's scale. The worker turns dropout off so that `reference_gradient` can
    match it.
    """
    import optax

    from siim_jax import sharding
    from siim_jax.training import losses
    from siim_jax.training.state import build_train_state, make_train_step

    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=0.0)
    model_def, state = build_train_state(model, optimizer, seed=0, ema=False)
    step = make_train_step(
        model_def, losses.make_loss(LOSS_CONFIG), optimizer, optax.constant_schedule(1.0), mesh, grad_accum=accum
    )
    state, _ = step(sharding.replicate(state, mesh), global_batch(batch, mesh))
    return flat_params(optax.tree.get(state.opt_state, "trace"))


def reference_gradient(accum: int, batch: dict) -> dict:
    """What the train step's gradient should be, on one device without sharding or a train step.

    The batch splits into `accum` micro-batches, micro-batch k holding rows k, k + accum, ... (the documented
    split of `train_state.split_micro_batches`); BatchNorm normalises each with its own statistics, and the
    gradient is the mean over the micro-batches of each one's gradient of its mean loss.
    """
    import jax
    from flax import nnx

    from siim_jax.training import losses
    from tests.tiny_model import TinySegmenter

    model = TinySegmenter(dropout=0.0, rngs=nnx.Rngs(0))
    loss_fn = losses.make_loss(LOSS_CONFIG)

    def loss(model, micro):
        outputs = model(micro["image"], train=True)
        return loss_fn(outputs.mask_logits, micro["mask"], outputs.class_logits, micro["positive"])[0]

    grad_fn = nnx.jit(nnx.grad(loss))
    with jax.default_device(jax.devices()[0]):
        micro_batches = [{name: values[index::accum] for name, values in batch.items()} for index in range(accum)]
        grads = [grad_fn(model, micro) for micro in micro_batches]
        return flat_params(jax.tree.map(lambda *parts: sum(parts) / accum, *grads))


def global_batch(batch: dict, mesh) -> dict:
    """The global batch as arrays sharded over `mesh`, built from this process's rows only."""
    import jax

    from siim_jax import sharding

    rows = sharding.local_batch_size(len(batch["image"]), mesh)
    start = jax.process_index() * rows
    return {
        name: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), values[start : start + rows])
        for name, values in batch.items()
    }


def prefixed(prefix: str, arrays: dict) -> dict:
    return {prefix + name: value for name, value in arrays.items()}


def flat_params(params) -> dict:
    """{'['conv1']['kernel']...': array} of a parameter pytree."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


if __name__ == "__main__":
    main()
