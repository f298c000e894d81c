"""Training: `train_and_evaluate(config, workdir)`, which `siim-jax train --config NAME[:arg] --workdir DIR` runs.

One flat loop of jitted steps over a data-parallel mesh of every device, fed by one grain iterator of the whole run;
validation Dice at the end of each epoch; checkpoints of the latest and the best steps in `DIR/checkpoints`; metrics
in `DIR/metrics.jsonl`, `DIR/tensorboard/` (with the config and a contact sheet of validation contours) and
`DIR/curves.png`. A run resumes from its latest checkpoint unless `--no-resume`, and continues exactly: the same
next batch, dropout keys and schedule step. SIGINT or SIGTERM saves the current step and exits; a non-finite
loss stops the run naming the step, leaving the checkpoints as they were; so does an input batch that does not
come within `data.batch_timeout_s`, naming the stage it waits on. Each logging step also records the fraction of
the time the device waited for input (`train/data_wait_fraction`) and the input rate (`train/input_images_per_s`),
also shown on the progress bar. Images left out of training (malformed labels, unreadable files; see
`data.strict`) are listed with the reason in `DIR/skipped.csv`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import signal
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from siim_jax import config_utils, pictures
from siim_jax import sharding as sharding_lib
from siim_jax.data import pipeline
from siim_jax.data.augment import model_input
from siim_jax.metrics import MetricAccumulator
from siim_jax.models import build_model, build_unfilled
from siim_jax.training import optim
from siim_jax.training.checkpoints import CHECKPOINT_DIR, TrainingCheckpoints, load_initial_weights
from siim_jax.training.feed import InputMonitor
from siim_jax.training.logging import MetricWriter
from siim_jax.training.losses import make_loss
from siim_jax.training.state import EVAL_INPUTS, TRAIN_INPUTS, build_train_state, make_eval_step, make_train_step

SKIPPED_FILE = "skipped.csv"  # images left out of training or validation, and why
SHEET_IMAGES = 4  # validation images drawn in TensorBoard at each evaluation

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ bookkeeping


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Steps of each epoch (balanced resampling can change them from epoch to epoch) and where the run stops."""

    steps: tuple[int, ...]
    total_steps: int

    @classmethod
    def build(cls, config: ml_collections.ConfigDict, frame) -> EpochPlan:
        steps = tuple(
            pipeline.steps_per_epoch(config.data, frame, epoch, config.train.batch_size)
            for epoch in range(config.train.epochs)
        )
        total = sum(steps) if config.train.max_steps <= 0 else min(sum(steps), config.train.max_steps)
        return cls(steps, total)

    @functools.cached_property
    def epoch_ends(self) -> dict[int, int]:
        """{step: the epoch that ends after that many steps}; max_steps ends the epoch it falls in."""
        ends = {}
        for epoch, end in enumerate(itertools.accumulate(self.steps)):
            ends.setdefault(min(end, self.total_steps), epoch)
        return ends


class PendingMetrics:
    """Per-step metrics left on the device until a log step, then fetched at once and checked."""

    def __init__(self):
        self._steps: list[int] = []
        self._metrics: list[dict] = []
        self._since = time.perf_counter()

    def add(self, step: int, metrics: dict) -> None:
        self._steps.append(step)
        self._metrics.append(metrics)

    def flush(self, images_per_step: int) -> dict[str, float]:
        """Means since the last flush, and images/s; raises NonFiniteLossError naming the first bad step."""
        if not self._metrics:
            return {}
        fetched = jax.device_get(self._metrics)
        for step, metrics in zip(self._steps, fetched):
            if not np.isfinite(metrics["loss"]):
                raise NonFiniteLossError(
                    f"non-finite loss {float(metrics['loss'])} at step {step} (components: "
                    f"{ {k: float(v) for k, v in metrics.items()} }); stopping without saving this state"
                )
        now = time.perf_counter()
        means = {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}
        means["images_per_s"] = len(fetched) * images_per_step / max(now - self._since, 1e-9)
        self._steps, self._metrics, self._since = [], [], now
        return means

    def restart_clock(self) -> None:
        self._since = time.perf_counter()


class StopSignals:
    """Turns SIGINT / SIGTERM into a request to save and stop; a second SIGINT interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        log.warning("%s received: saving a checkpoint and stopping", signal.Signals(signum).name)
        self.received = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, sync: bool) -> bool:
        """Whether to stop now. Across processes the answer must agree: with `sync`, any process's signal
        counts (a collective, so it is asked only at log steps); without, a multi-process run says no."""
        if jax.process_count() == 1:
            return self.received is not None
        if not sync:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.received or 0))
        self.received = self.received or (int(flags.max()) or None)
        return self.received is not None


# --------------------------------------------------------------------------------------------------- helpers


def init_model(model_config: ml_collections.ConfigDict, seed: int) -> nnx.Module:
    """The model randomly initialised from `seed`, then loaded from `init_from` if set.

    Initialisation is one jitted program drawing from an 'rbg' key: op-by-op init, and threefry's hash rounds
    over millions of weights, take minutes to compile on CPU.
    """
    model = build_unfilled(model_config)

    def initial_weights():
        fresh = build_model(model_config, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
        return nnx.state(fresh, (nnx.Param, nnx.BatchStat))

    weights = jax.jit(initial_weights)()
    nnx.update(model, weights)
    if model_config.init_from:
        load_initial_weights(model, model_config.init_from)
    return model


def check_batch_sizes(train_config: ml_collections.ConfigDict, devices: int) -> None:
    """Every micro-batch and evaluation batch must split evenly over the devices."""
    micro_batch = train_config.batch_size // max(train_config.grad_accum, 1)
    if train_config.grad_accum < 1 or micro_batch * train_config.grad_accum != train_config.batch_size:
        raise ValueError(
            f"train.batch_size={train_config.batch_size} must be a multiple of "
            f"train.grad_accum={train_config.grad_accum}"
        )
    for name, size in (("batch_size / grad_accum", micro_batch), ("eval_batch_size", eval_batch_size(train_config))):
        if size % devices:
            raise ValueError(f"train.{name} = {size} must be a multiple of the {devices} devices")


# What a resumed run may change: where the files are, how they load, what is logged and kept. Every other field
# shapes the batches, the schedule, the model or the validation that steers the plateau schedule, so resuming
# under another value would go on as a run that never was.
RESUMABLE_CHANGES = frozenset({
    "data.root", "data.labels_csv", "data.prepared_dir",  # the same files on another machine
    "data.workers", "data.prefetch", "data.batch_timeout_s",
    "model.init_from", "model.remat",  # init_from is read only when a run starts; remat recomputes the same values
    "train.eval_at_start", "train.eval_batch_size", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_best", "train.keep_last",
})


def check_resumable(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Refuses to resume the run saved with config `saved` under `config` if a field outside RESUMABLE_CHANGES
    differs, naming each."""
    saved, now = config_utils.flat(saved), config_utils.flat(config)
    differing = [
        f"{key}: {saved.get(key)!r} saved, {value!r} now"
        for key, value in now.items()
        if key not in RESUMABLE_CHANGES and saved.get(key) != value
    ]
    if differing:
        raise config_utils.ConfigError(
            f"{workdir} was trained under another config and would not continue as the same run: "
            + "; ".join(differing)
            + ". Resume with the saved values, or train in a new workdir (model.init_from=" + str(workdir)
            + " starts from its weights)"
        )


def eval_batch_size(train_config: ml_collections.ConfigDict) -> int:
    return train_config.eval_batch_size or train_config.batch_size


def evaluate(eval_step, state, config: ml_collections.ConfigDict, frame, mesh, skipped_csv=None) -> dict[str, float]:
    """Challenge metrics over every image of `frame` (padding and unreadable rows left out, the latter added to
    `skipped_csv`)."""
    batches = pipeline.eval_batches(
        config.data, frame, eval_batch_size(config.train), sharding=sharding_lib.batch_sharding(mesh),
        skipped_csv=skipped_csv,
    )
    params = state.eval_params
    outputs = [eval_step(params, state.batch_stats, {k: batch[k] for k in EVAL_INPUTS}) for batch in batches]
    accumulator = MetricAccumulator()
    for stats in jax.device_get(outputs):
        accumulator.add(stats, valid=stats["valid"])
    return accumulator.summarise()


def make_sheet_step(model_def, mesh, threshold: float):
    """`sheet_step(params, batch_stats, batch) -> (uint8 grey images, predicted masks, true masks)`, replicated so
    that process 0 can draw them."""

    def step(params, batch_stats, batch):
        (mask_logits, _), _ = model_def.apply(params, batch_stats, model_input(batch["image"]), train=False)
        return batch["image"], jax.nn.sigmoid(mask_logits[..., 0]) > threshold, batch["mask"] > 0

    replicated = sharding_lib.replicated(mesh)
    in_shardings = (replicated, replicated, sharding_lib.batch_sharding(mesh))
    return jax.jit(step, in_shardings=in_shardings, out_shardings=replicated)


def validation_sheet(sheet_step, state, config: ml_collections.ConfigDict, frame, mesh) -> np.ndarray:
    """A contact sheet of the first SHEET_IMAGES validation images, predicted contours red and true ones green."""
    size = -(-SHEET_IMAGES // mesh.size) * mesh.size  # one batch that splits over the devices
    (batch,) = pipeline.eval_batches(config.data, frame.head(size), size, sharding=sharding_lib.batch_sharding(mesh))
    greys, predicted, true = jax.device_get(sheet_step(state.eval_params, state.batch_stats, batch))
    tiles = [
        (pictures.render_overlay(grey, pred, truth), image_id[-12:])
        for grey, pred, truth, image_id in zip(greys[:SHEET_IMAGES], predicted, true, frame["image_id"])
    ]
    return pictures.contact_sheet([("validation: predicted red, true green", tiles)])


def _prefixed(prefix: str, values: dict) -> dict[str, float]:
    return {f"{prefix}/{name}": value for name, value in values.items()}


def _log_train(step: int, pending: PendingMetrics, writer: MetricWriter, progress, result: dict, batch_size: int,
               feed: InputMonitor):
    """Fetches the pending step metrics (checking the loss), writes their means with the input figures of the
    same interval and moves the bar on to `step`.

    Steps run asynchronously: only the fetch tells that they have finished, so the bar moves here, at the
    logging interval, and its rate counts completed steps."""
    means = pending.flush(batch_size)
    if means:
        means.update(feed.interval())  # after the fetch's host sync: the interval's wall time is complete
        writer.write(step, _prefixed("train", means))
        progress.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{means['images_per_s']:.1f}",
                             data_wait=f"{means['data_wait_fraction']:.0%}", refresh=False)
        progress.update(step - progress.n)
        result["train_loss"] = means["loss"]


# ------------------------------------------------------------------------------------------------------ loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, resume: bool = True) -> dict:
    """Trains (or resumes) per `config` in `workdir`; returns the last validation metrics and how the run ended.

    Result keys: 'step', 'dice', 'iou', 'dice_positive', 'auc', 'n_images' (of the last evaluation, also read
    back from the checkpoint when there was nothing left to train), 'train_loss' (mean over the last logging
    window, NaN if none) and 'stopped_by' (None, 'SIGINT' or 'SIGTERM').
    """
    config = config_utils.from_dict(config)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding_lib.data_mesh()
    check_batch_sizes(config.train, mesh.size)
    splits = pipeline.build_datasets(config.data)
    skipped_csv = workdir / SKIPPED_FILE
    if jax.process_index() == 0:
        pipeline.write_skipped(skipped_csv, splits.skipped)  # also the first write: an unwritable workdir fails here
    if len(splits.skipped):
        log.warning("%d images left out of training, listed with the reasons in %s", len(splits.skipped), skipped_csv)
    plan = EpochPlan.build(config, splits.train)

    optimizer = optim.build_optimizer(config.optim)
    model_def, state = build_train_state(
        init_model(config.model, config.train.seed), optimizer, config.train.seed, ema=config.optim.ema_decay > 0
    )
    state = sharding_lib.replicate(state, mesh)
    train_step = make_train_step(
        model_def,
        make_loss(config.loss),
        optimizer,
        optim.make_schedule(config.optim, plan.total_steps),
        mesh,
        grad_accum=config.train.grad_accum,
        ema_decay=config.optim.ema_decay,
        flatten=config.optim.flatten,
    )
    eval_step = make_eval_step(model_def, mesh, config.train.threshold)
    sheet_step = make_sheet_step(model_def, mesh, config.train.threshold)
    input_progress = pipeline.PipelineProgress()
    result = {"train_loss": float("nan"), "stopped_by": None}
    with (
        TrainingCheckpoints(
            workdir / CHECKPOINT_DIR, config.train.keep_best, keep_last=config.train.keep_last
        ) as checkpoints,
        MetricWriter(workdir) as writer,
        StopSignals() as stop,
    ):
        start = checkpoints.latest_step() if resume else None
        # Each step takes one batch, so the saved position is `start`: starting the batches there lets restoring
        # the position below find them in place, rather than start the loading workers a second time.
        train_iter = pipeline.train_iterator(
            config.data, splits.train, range(len(plan.steps)), config.train.batch_size,
            sharding=sharding_lib.batch_sharding(mesh), skipped_csv=skipped_csv, progress=input_progress,
            start_batch=start or 0,
        )
        if start is not None:
            check_resumable(checkpoints.restore_config(start), config, workdir)
            state = checkpoints.restore_state(start, state, mesh)
            checkpoints.restore_data_iterator(start, train_iter)
            log.info("resumed from step %d", start)
            result.update(checkpoints.metrics(start) or {})
        else:
            start = 0
            if checkpoints.all_steps():
                raise FileExistsError(
                    f"{workdir / CHECKPOINT_DIR} already has checkpoints; resume or use a new workdir"
                )
            writer.text("config", f"```\n{config}\n```")
            if config.train.eval_at_start:
                writer.write(0, _prefixed("val", evaluate(eval_step, state, config, splits.val, mesh, skipped_csv)))
        pending = PendingMetrics()
        feed = InputMonitor(train_iter, config.train.batch_size, config.data.batch_timeout_s, input_progress)
        step = start
        progress = tqdm(total=plan.total_steps, initial=start, unit="step", disable=jax.process_index() > 0)
        for step, batch in zip(range(start + 1, plan.total_steps + 1), feed):
            state, metrics = train_step(state, {k: batch[k] for k in TRAIN_INPUTS})
            feed.step_dispatched(metrics)
            pending.add(step, metrics)
            ended_epoch = plan.epoch_ends.get(step)
            log_now = step % config.train.log_every_steps == 0 or ended_epoch is not None
            if log_now:
                _log_train(step, pending, writer, progress, result, config.train.batch_size, feed)
            if ended_epoch is not None:  # evaluates and saves, also when a signal came in meanwhile
                val_metrics = None
                if (ended_epoch + 1) % config.train.eval_every_epochs == 0 or step == plan.total_steps:
                    val_metrics = evaluate(eval_step, state, config, splits.val, mesh, skipped_csv)
                    plateau = optim.plateau_update(jax.device_get(state.plateau), val_metrics["dice"], config.optim)
                    state = state.replace(plateau=sharding_lib.replicate(plateau, mesh))
                    writer.write(step, {**_prefixed("val", val_metrics), "epoch": ended_epoch + 1})
                    writer.image("val/contours", validation_sheet(sheet_step, state, config, splits.val, mesh), step)
                    result.update(val_metrics)
                    if jax.process_index() == 0:
                        log.info("epoch %d step %d: %s", ended_epoch, step, val_metrics)
                checkpoints.save(step, state, config, train_iter, metrics=val_metrics)
                writer.plot()
                pending.restart_clock()  # images/s counts training time only
                feed.restart_clock()
            stopping = stop.requested(sync=log_now)
            if stopping or (config.train.checkpoint_every_steps and step % config.train.checkpoint_every_steps == 0):
                _log_train(step, pending, writer, progress, result, config.train.batch_size, feed)  # checks the loss
                checkpoints.save(step, state, config, train_iter)  # no-op at an epoch's end, saved above
            if stopping:
                break
        progress.close()
        feed.close()
    result.update(step=step, stopped_by=None if stop.received is None else signal.Signals(stop.received).name)
    return result
