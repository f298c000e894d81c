"""Training checkpoints: one orbax CheckpointManager in `workdir/checkpoints`, and loading them for inference.

Layout of `workdir/checkpoints/<step>/`:
  state/      the TrainState (step, params, batch_stats, opt_state, ema_params, rng, plateau), orbax PyTree
  config/     the full training config as JSON
  data_iter/  the position of the run's training iterator (every epoch in one): the batches it handed out, one
              `process_<i>-of-<n>.json` per process (grain's handler). A run resumes with as many processes as
              saved, each with any number of devices and of loading workers
  metrics/    validation metrics of an end-of-epoch checkpoint ({'dice', 'dice_gated', 'dice_positive', 'auc', ...})

Kept: the `keep_last` latest steps (at least one, for resuming; more for `average_last`) and the `keep_best` steps
ranked best by RANKING_METRICS: 'dice_pp', the validation Dice after the best post-processing of a small grid
(metrics.postprocessed_dice), which tracks the Dice that `tune`d post-processing scores (README: "Which checkpoints
to average"); checkpoints saved before it existed fall back to the class-gated Dice, then the plain Dice. A checkpoint
without metrics (a periodic or interrupt save mid-epoch) is dropped once it is no longer among the latest and the
run holds more than `keep_best` checkpoints (orbax's BestN keeps everything up to that count).

Averaging several steps (`average_top`, `average_last`) averages the parameters and, by default, the steps' running
BatchNorm statistics (`bn_statistics='average'`). `'recompute'` measures them afresh for the averaged weights, as
SWA does (siim_jax.training.averaging), on batches drawn as in training. On the quality study's folds recomputing
lost to averaging (README, "Do the winners' practices help here?"): the running statistics of late checkpoints
already describe the averaged network closely, and a recomputation from a few batches adds its own error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from orbax.checkpoint import checkpoint_managers as policies

from siim_jax import config_utils
from siim_jax import sharding as sharding_lib
from siim_jax.data import pipeline
from siim_jax.data.augment import model_input
from siim_jax.models import build_unfilled
from siim_jax.models import io as model_io
from siim_jax.training import averaging

CHECKPOINT_DIR = "checkpoints"
RANKING_METRICS = ("dice_pp", "dice_gated", "dice")  # the first a checkpoint's metrics hold; see metrics.py

log = logging.getLogger(__name__)


def _best_metric(metrics) -> float:
    return float(next(metrics[name] for name in RANKING_METRICS if name in metrics))


class _WithoutMetricsIsExpected(logging.Filter):
    """Hides orbax's warning for a save without metrics: mid-epoch checkpoints have none by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_WithoutMetricsIsExpected())  # orbax logs through absl


class TrainingCheckpoints:
    """The checkpoint manager of a training run (a context manager; close() waits for pending saves)."""

    def __init__(self, directory: str | Path, keep_best: int = 3, read_only: bool = False, keep_last: int = 1):
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=max(keep_last, 1)),
                policies.BestN(
                    get_metric_fn=_best_metric, n=keep_best, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_metric,  # also what makes the manager write the metrics item
            best_mode="max",
            preservation_policy=preservation,
            read_only=read_only,
            create=not read_only,
        )
        self.directory = Path(directory).absolute()
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "data_iter": grain.checkpoint.CheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def __enter__(self) -> TrainingCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, config: ml_collections.ConfigDict, data_iterator, metrics=None) -> bool:
        """Saves asynchronously; returns False (and saves nothing) when `step` is already saved."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            config=ocp.args.JsonSave(config.to_dict()),
            data_iter=grain.checkpoint.CheckpointSave(data_iterator),
        )
        clean_metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self.manager.save(step, args=args, metrics=clean_metrics, force=True)

    def restore_state(self, step: int, like, mesh: Mesh):
        """The TrainState saved at `step`, of `like`'s structure (arrays or ShapeDtypeStructs), replicated over
        `mesh`, whichever devices saved it."""
        return self._restore_state(step, like, mesh, partial=False)

    def restore_data_iterator(self, step: int, data_iterator) -> None:
        """Moves a fresh training iterator of the run to where the run saved at `step` had got to.

        Each process saved the position of its own iterator, over its rows of every global batch. A run with
        another number of processes would read another process's rows (or no file at all), so it is refused;
        another number of devices per process changes no process's rows.
        """
        saved = len(list((self.directory / str(step) / "data_iter").glob("process_*-of-*.json")))
        if saved != jax.process_count():
            raise ValueError(
                f"step {step} in {self.directory} was saved by {saved} processes and this run has "
                f"{jax.process_count()}: each process saved its own position in the training data, so resume it "
                f"with {saved} processes (each with any number of devices)"
            )
        self.manager.restore(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(data_iterator)))

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return config_utils.from_dict(restored.config)

    def metrics(self, step: int) -> dict | None:
        return self.manager.metrics(step)

    def best_steps(self, count: int) -> list[int]:
        """Up to `count` steps with validation metrics, best first by RANKING_METRICS."""
        scored = [(self.metrics(step), step) for step in self.all_steps()]
        scored = [(_best_metric(m), step) for m, step in scored if m is not None]
        return [step for _, step in sorted(scored, key=lambda item: (-item[0], item[1]))[:count]]

    def restore_weights(self, step: int, like: dict) -> dict:
        """Only the TrainState fields named in `like` (a partial restore), replicated over every device of this
        run."""
        return dict(self._restore_state(step, like, None, partial=True))

    def _restore_state(self, step: int, like, mesh: Mesh | None, partial: bool):
        target = sharding_lib.restore_target(like, mesh)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=partial)
        return self.manager.restore(step, args=ocp.args.Composite(state=args)).state


def checkpoint_directory(path: str | Path) -> Path:
    """`path/checkpoints` for a training workdir, else `path` itself."""
    path = Path(path)
    return path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path


def _select_steps(checkpoints: TrainingCheckpoints, step: int | None, best: bool, average_top: int,
                  average_last: int) -> list[int]:
    available = checkpoints.all_steps()
    if not available:
        raise FileNotFoundError(f"no checkpoints in {checkpoints.directory}")
    if sum((step is not None, best, average_top > 0, average_last > 0)) > 1:
        raise ValueError("give at most one of step, best, average_top and average_last")
    if average_top > 0:
        steps = checkpoints.best_steps(average_top)
        if len(steps) < average_top:
            raise ValueError(
                f"average_top={average_top} but only {len(steps)} checkpoints in {checkpoints.directory} have "
                f"validation metrics (steps {steps})"
            )
        return steps
    if average_last > 0:
        if len(available) < average_last:
            raise ValueError(
                f"average_last={average_last} but {checkpoints.directory} holds {len(available)} checkpoints (steps "
                f"{available}); train with train.keep_last >= {average_last}"
            )
        return available[-average_last:]
    if best:
        steps = checkpoints.best_steps(1)
        if not steps:
            raise ValueError(f"no checkpoint in {checkpoints.directory} has validation metrics")
        return steps
    if step is None:
        return [available[-1]]
    if step not in available:
        raise ValueError(f"step {step} is not saved in {checkpoints.directory}; saved steps: {available}")
    return [step]


def training_batches(config: ml_collections.ConfigDict) -> Iterator[np.ndarray]:
    """Model inputs of the run's last training epoch as training drew it (balanced, augmented) in batches of the
    training micro-batch size: the kind of batches its running BatchNorm statistics were averaged over."""
    micro_batch = config.train.batch_size // max(config.train.grad_accum, 1)
    try:
        frame = pipeline.build_datasets(config.data).train
        batches = pipeline.train_iterator(config.data, frame, [config.train.epochs - 1], micro_batch,
                                          process_index=0, process_count=1)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"recomputing the BatchNorm statistics of averaged checkpoints needs the run's training images "
            f"(data.root {config.data.root!r}): {error}"
        ) from error
    for batch in batches:
        yield model_input(np.asarray(batch["image"]))


BN_STATISTICS = ("average", "recompute")


def restore_for_inference(
    path: str | Path, step: int | None = None, best: bool = False, average_top: int = 0, average_last: int = 0,
    bn_statistics: str = "average",
) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """(model, config) from a training workdir, its checkpoints dir, or a `model_io` model dir.

    From training checkpoints: the latest step, or `step`, or the best-ranked step (`best`, RANKING_METRICS), or
    the parameters averaged over the `average_top` best-ranked steps or the `average_last` latest steps, with their
    BatchNorm statistics averaged, or with `bn_statistics='recompute'` recomputed for the average on the run's
    training batches (`averaging`, `training_batches`) unless all the steps' statistics agree. The weights are the
    EMA ones when the run kept an EMA (`optim.ema_decay > 0`). The config is the run's full config. A model dir
    holds one set of weights; its config is returned as `ConfigDict({'model': model_config})`.
    """
    if bn_statistics not in BN_STATISTICS:
        raise ValueError(f"bn_statistics must be one of {BN_STATISTICS}, got {bn_statistics!r}")
    path = Path(path)
    if (path / model_io.CONFIG_FILE).is_file():
        if step is not None or best or average_top or average_last:
            raise ValueError(f"{path} is a model directory with one set of weights: step/best/averaging do not apply")
        model, model_config = model_io.load_model(path)
        return model, ml_collections.ConfigDict({"model": model_config})
    with TrainingCheckpoints(checkpoint_directory(path), read_only=True) as checkpoints:
        steps = _select_steps(checkpoints, step, best, average_top, average_last)
        config = checkpoints.restore_config(steps[0])
        model = build_unfilled(config.model)
        graph, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        use_ema = config.optim.ema_decay > 0
        target = {"params": params, "batch_stats": batch_stats}
        if use_ema:
            target["ema_params"] = params
        restored = [checkpoints.restore_weights(s, target) for s in steps]
    log.info("restored %s step(s) %s%s", checkpoints.directory, steps, " (EMA weights)" if use_ema else "")
    weights = averaging.mean_of(restored)
    model = nnx.merge(graph, weights["ema_params" if use_ema else "params"], weights["batch_stats"], rest)
    if bn_statistics == "recompute" and not averaging.batch_stats_agree([w["batch_stats"] for w in restored]):
        count = averaging.recompute_batch_stats(model, training_batches(config))
        log.info("recomputed the BatchNorm statistics of the average on %d training batches", count)
    return model, config


def restore_config(
    path: str | Path, step: int | None = None, best: bool = False, average_top: int = 0, average_last: int = 0
) -> ml_collections.ConfigDict:
    """The config that `restore_for_inference` returns for the same arguments, without reading any weights."""
    path = Path(path)
    if (path / model_io.CONFIG_FILE).is_file():
        return ml_collections.ConfigDict({"model": model_io.read_model_config(path)})
    with TrainingCheckpoints(checkpoint_directory(path), read_only=True) as checkpoints:
        return checkpoints.restore_config(_select_steps(checkpoints, step, best, average_top, average_last)[0])


def load_initial_weights(model: nnx.Module, path: str | Path) -> None:
    """`config.model.init_from`: a `model_io` directory, or a training run whose best step is taken.

    Either way `model_io.copy_weights` does the copying, with its checks that the networks match.
    """
    best = not (Path(path) / model_io.CONFIG_FILE).is_file()
    trained, _ = restore_for_inference(path, best=best)
    model_io.copy_weights(trained, model, path)
