"""Saves and loads checkpoints of `tests.tiny_model` in a process with a given number of CPU devices.

    python tests/topology_worker.py save DIR --devices N
        DIR/mesh: the weights replicated over all N devices; with N > 1 also DIR/device<N-1>: the weights on the
        last device alone. Each holds model/ (a `model_io` directory, every weight MODEL_VALUE) and run/ (training
        checkpoints of steps 1-3, see `save_run`).
    python tests/topology_worker.py load OUT.npz DIR... --devices N
        restores every placement of each DIR every way prediction and training read them, saving for
        '<dir>/<placement>/<case>' the weights ('.../params', '.../batch_stats') and predictions ('.../predicted')
        with the predictions of the same weights set without a checkpoint ('.../expected').
    python tests/topology_worker.py train CONFIG.json WORKDIR OUT.npz --devices N [--stop-after K]
        `train.train_and_evaluate` with the tiny model; SIGTERM after step K. Saves for each step S the state
        before and after it ('S/before...', 'S/after...') and its batch ('S/batch/<name>').

Run by test_topology.py in fresh interpreters: the device count is fixed at JAX start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

MODEL_VALUE = 0.625
# Training checkpoints: step S holds every float weight at S / 4 (exact in float32, so means are exact), EMA
# weights at S / 4 + 1, and BatchNorm statistics at RUN_BATCH_STAT in every step (so that a recomputation, which
# needs training images these runs have none of, never applies); steps 1 and 2
# have validation Dice, step 3 none.
RUN_DICE = {1: 0.5, 2: 0.9, 3: None}
RUN_BATCH_STAT = 0.875
IMAGES = 2  # images predicted per case
PIXELS = 16


def run_value(step: int) -> float:
    return step / 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["save", "load", "train"])
    parser.add_argument("paths", type=Path, nargs="+")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--stop-after", type=int, default=0)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from siim_jax import models
    from tests.tiny_model import build_tiny_model

    models.build_model = build_tiny_model  # as the `tiny_model` fixture does (and in `train`, below)
    if args.command == "save":
        save(args.paths[0])
    elif args.command == "load":
        load(args.paths[0], args.paths[1:])
    else:
        run_training(*args.paths, stop_after=args.stop_after)


def small_config():
    from siim_jax.configs.defaults import default_config

    config = default_config()
    config.optim.ema_decay = 0.5
    return config


def filled(tree, value: float):
    """`tree`'s float arrays set to `value`; other arrays (counts, keys) to 1."""
    import jax
    import numpy as np

    def fill(leaf):
        return np.full(leaf.shape, value if np.issubdtype(leaf.dtype, np.floating) else 1, leaf.dtype)

    return jax.tree.map(fill, tree)


def filled_model(value: float, batch_stat_value: float | None = None):
    """The tiny model with every parameter at `value` and every batch statistic at `batch_stat_value` (default:
    `value`), set directly, without a checkpoint."""
    from flax import nnx

    from tests.tiny_model import TinySegmenter

    model = TinySegmenter(rngs=nnx.Rngs(0))
    stats = value if batch_stat_value is None else batch_stat_value
    nnx.update(model, filled(nnx.state(model, nnx.Param), value), filled(nnx.state(model, nnx.BatchStat), stats))
    return model


def placements(devices: list):
    """{name: function placing a pytree}: replicated over every device, and on the last one alone when several."""
    import jax

    from siim_jax import sharding

    mesh = sharding.data_mesh(devices)
    places = {"mesh": lambda tree: sharding.replicate(tree, mesh)}
    if len(devices) > 1:
        places[f"device{len(devices) - 1}"] = lambda tree: jax.device_put(tree, devices[-1])
    return places


def save(directory: Path) -> None:
    import jax
    from flax import nnx

    from siim_jax.models import io as model_io

    for name, place in placements(jax.devices()).items():
        model = filled_model(MODEL_VALUE)
        nnx.update(model, place(nnx.state(model, (nnx.Param, nnx.BatchStat))))
        model_io.save_model(directory / name / "model", model, small_config().model)
        save_run(directory / name / "run", place)


def save_run(workdir: Path, place) -> None:
    import grain
    from flax import nnx

    from siim_jax.training import optim
    from siim_jax.training.checkpoints import TrainingCheckpoints
    from siim_jax.training.state import build_train_state
    from tests.tiny_model import TinySegmenter

    config = small_config()
    _, state = build_train_state(TinySegmenter(rngs=nnx.Rngs(0)), optim.build_optimizer(config.optim), 0, ema=True)
    with TrainingCheckpoints(workdir / "checkpoints") as checkpoints:
        for step, dice in RUN_DICE.items():
            state = filled(state, run_value(step))
            state = state.replace(ema_params=filled(state.ema_params, run_value(step) + 1),
                                  batch_stats=filled(state.batch_stats, RUN_BATCH_STAT))
            metrics = None if dice is None else {"dice": dice}
            checkpoints.save(step, place(state), config, iter(grain.MapDataset.range(4).to_iter_dataset()), metrics)


def weights(model) -> dict:
    """{'params': every parameter, 'batch_stats': every batch statistic}, each flattened into one array."""
    import jax
    import numpy as np
    from flax import nnx

    kinds = {"params": nnx.Param, "batch_stats": nnx.BatchStat}
    return {name: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(nnx.state(model, kind))])
            for name, kind in kinds.items()}


def load(out: Path, directories: list[Path]) -> None:
    import numpy as np

    from siim_jax.inference.predictor import Inference, Predictor
    from siim_jax.models import io as model_io
    from siim_jax.training.checkpoints import restore_for_inference

    images = np.random.default_rng(0).integers(0, 256, (IMAGES, PIXELS, PIXELS), np.uint8)
    results = {}
    for root in sorted(path for directory in directories for path in directory.iterdir()):
        prefix = f"{root.parent.name}/{root.name}/"
        restored = {
            "load_model": model_io.load_model(root / "model")[0],
            "latest": restore_for_inference(root / "run")[0],
            "best": restore_for_inference(root / "run", best=True)[0],
            "average_top2": restore_for_inference(root / "run", average_top=2)[0],
        }
        for case, model in restored.items():
            results.update({f"{prefix}{case}/{name}": value for name, value in weights(model).items()})
        predicted = {  # case: (checkpoint, its options, parameter and batch statistic values)
            "model_dir": (root / "model", {}, MODEL_VALUE, MODEL_VALUE),
            "best": (root / "run", {"best": True}, run_value(2) + 1, RUN_BATCH_STAT),
        }
        for case, (path, options, value, stat) in predicted.items():
            inference = Inference.from_checkpoint(path, image_size=PIXELS, batch_size=IMAGES, **options)
            results[f"{prefix}{case}/predicted"] = inference.predictor(images)[0]
            results[f"{prefix}{case}/expected"] = Predictor(filled_model(value, stat), batch_size=IMAGES)(images)[0]
    np.savez(out, **results)


def run_training(config_file: Path, workdir: Path, out: Path, stop_after: int) -> None:
    import jax
    import numpy as np

    from siim_jax import config_utils
    from siim_jax.training import loop as train
    from tests.tiny_model import build_tiny_model

    config = config_utils.from_dict(json.loads(config_file.read_text()))
    make = train.make_train_step
    records = {}

    def flat(prefix: str, tree) -> dict:
        leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
        return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}

    def recording(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def step(state, batch):
            number = int(state.step) + 1
            records.update(flat(f"{number}/before", state))
            records.update({f"{number}/batch/{name}": np.asarray(rows) for name, rows in jax.device_get(batch).items()})
            state, metrics = step_fn(state, batch)
            records.update(flat(f"{number}/after", state))
            if number == stop_after:
                os.kill(os.getpid(), signal.SIGTERM)
            return state, metrics

        return step

    train.make_train_step = recording
    train.build_model = build_tiny_model
    result = train.train_and_evaluate(config, workdir)
    np.savez(out, **records, result_step=result["step"], stopped_by=str(result["stopped_by"]))


if __name__ == "__main__":
    main()
