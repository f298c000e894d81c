"""Crash-test children: `siim-jax train` (or `siim-jax cv`) with the tiny test model and a switch to signal itself at
a chosen point, and a submission writer killed mid-file.

    python -m tests.kill_worker [--compilation-cache DIR] [--at POINT:STEP] <siim-jax train arguments>
    python -m tests.kill_worker [--compilation-cache DIR] [--at POINT:STEP] cv <siim-jax cv arguments>

DIR is a persistent JAX compilation cache shared by the runs of a test. POINT is `kill-mid-step` (dispatch step
STEP, SIGKILL while it runs; under `cv`, in the first fold that trains),
`kill-after-save` (start the checkpoint save of STEP, SIGKILL while orbax is still
writing it) or `term-mid-step` (SIGTERM while step STEP runs). Before signalling, the worker writes
WORKDIR/signalled.json: the signal, the step and the checkpoints complete on disk at that moment. The model is
`tests.tiny_model.TinySegmenter`, so a run starts in seconds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import jax
import pytest

from siim_jax import cli, models
from siim_jax.training import checkpoints
from siim_jax.training import loop as train
from tests.tiny_model import build_tiny_model

SIGNALLED_FILE = "signalled.json"


@pytest.fixture(scope="session")
def forkserver():
    """A multiprocessing context whose children fork from a server that has imported the training code once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.kill_worker", "matplotlib.pyplot"])
    return context


def run_child(forkserver, target, args, timeout_s: float) -> int:
    """Runs target(*args) in a forkserver child; returns its exit code (-9 after SIGKILL); fails after timeout_s."""
    child = forkserver.Process(target=target, args=args)
    child.start()
    child.join(timeout_s)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail(f"{target.__name__} did not end within {timeout_s} s")
    return child.exitcode


def completed_checkpoints(workdir) -> list[int]:
    """Steps whose checkpoint orbax has finalised (renamed from its temporary name to the bare step number)."""
    directory = Path(workdir) / checkpoints.CHECKPOINT_DIR
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit()) if directory.is_dir() else []


def _signal_self(workdir, signum: int, step: int) -> None:
    record = {"signal": signal.Signals(signum).name, "step": step, "completed": completed_checkpoints(workdir)}
    (Path(workdir) / SIGNALLED_FILE).write_text(json.dumps(record))
    os.kill(os.getpid(), signum)


def _during_step(workdir, step: int, signum: int) -> None:
    make_train_step = train.make_train_step

    def make_signalling_step(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)

        def signalling_step(state, batch):
            taking = int(jax.device_get(state.step)) + 1
            result = train_step(state, batch)  # dispatched asynchronously: the step is running now
            if taking == step:
                _signal_self(workdir, signum, step)
            return result

        return signalling_step

    train.make_train_step = make_signalling_step


def _after_save(workdir, step: int, signum: int) -> None:
    save = checkpoints.TrainingCheckpoints.save

    def save_then_signal(self, at_step, *args, **kwargs):
        started = save(self, at_step, *args, **kwargs)  # orbax goes on writing in a background thread
        if at_step == step:
            _signal_self(workdir, signum, step)
        return started

    checkpoints.TrainingCheckpoints.save = save_then_signal


POINTS = {
    "kill-mid-step": (_during_step, signal.SIGKILL),
    "kill-after-save": (_after_save, signal.SIGKILL),
    "term-mid-step": (_during_step, signal.SIGTERM),
}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compilation-cache"]:
        jax.config.update("jax_compilation_cache_dir", argv[1])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        argv = argv[2:]
    if argv[:1] == ["--at"]:
        point, _, step = argv[1].partition(":")
        install, signum = POINTS[point]
        argv = argv[2:]
        install(argv[argv.index("--workdir") + 1], int(step), signum)
    models.build_model = train.build_model = build_tiny_model
    if argv[:1] == ["cv"]:
        return cli.main(argv)
    return cli.main(["train", *argv])


class _ImageIdThatKills(str):
    """An ImageId that SIGKILLs its process when it is written out."""

    def __format__(self, spec: str) -> str:
        os.kill(os.getpid(), signal.SIGKILL)
        return super().__format__(spec)


def write_submission_killed_at(out, n_rows: int, killed_at: int) -> None:
    """Writes a submission of `n_rows` images with `submission.write_submission`, SIGKILLed while writing row
    `killed_at` (a multiprocessing target)."""
    from siim_jax.inference.submission import write_submission

    image_ids = [f"1.2.276.0.7230010.3.1.4.{index}" for index in range(n_rows)]
    image_ids[killed_at] = _ImageIdThatKills(image_ids[killed_at])
    write_submission(out, [(image_id, "1 2 3 4") for image_id in image_ids])


def run_logged(argv: list[str], log_path) -> None:
    """`main` with stdout and stderr sent to `log_path`, exiting with its status (a multiprocessing target)."""
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.exit(main(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
