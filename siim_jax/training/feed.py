"""The training step's view of its input: how long it waits for each batch, and an error instead of a silent hang.

`InputMonitor(iterator, batch_size, timeout_s, progress)` hands out the batches of `iterator` (a
`pipeline.train_iterator`, or any iterator of batches):

- `next(monitor)` waits at most `timeout_s` (None: for ever) for the next batch, then raises `InputStallError`
  naming the stage the batch is stuck in (from the `pipeline.PipelineProgress` the iterator was built with): the
  worker processes' start-up, a worker's element, or the device transfer; and how many batches came before.
- `monitor.step_dispatched(outputs)` after each step: the device then counts as busy until `outputs` are ready,
  and waiting for a batch while it is busy is not waiting (with JAX's asynchronous dispatch the host runs ahead).
- `monitor.interval()` (at a logging step, after a host sync) -> {'data_wait_fraction': seconds the device sat
  idle waiting for a batch over the wall seconds since the last call, 'input_images_per_s': images handed out
  per wall second}; `monitor.restart_clock()` leaves out a pause (evaluation, checkpointing).
- `monitor.first_batch_s`: seconds from the monitor's creation to its first batch (None before it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import jax

from siim_jax.data.pipeline import PipelineProgress

_IDLE_POLL_S = 0.002  # how often a waiting consumer checks whether the device has finished its last step
_STOP = object()


class InputStallError(TimeoutError):
    """No batch came within the timeout; the message names the stage that is waiting."""


def stall_stage(handed_out: int, progress: PipelineProgress | None) -> str:
    """The stage that batch number `handed_out` (0-based) is stuck in, from the pipeline's counters."""
    if progress is None:
        return f"batch {handed_out} from the input iterator (its stages are not tracked)"
    if progress.transferred > handed_out:
        return f"the hand-over of batch {handed_out}, already on the device"
    if progress.loaded > handed_out:
        return f"the device transfer of batch {handed_out}"
    if progress.workers == 0:
        return f"loading batch {handed_out} in this process (data.workers=0)"
    worker = handed_out % progress.workers  # grain hands out the workers' batches in turn
    if handed_out < progress.workers:
        return (f"worker start-up: worker {worker} has not delivered its first batch ({handed_out} of "
                f"{progress.workers} workers have)")
    return f"a worker's element: batch {handed_out}, from worker {worker} of {progress.workers}"


class InputMonitor(Iterator):
    """See the module docstring."""

    def __init__(self, iterator: Iterator, batch_size: int, timeout_s: float | None = None,
                 progress: PipelineProgress | None = None):
        self._iterator, self._batch_size, self._progress = iterator, batch_size, progress
        self._timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self._created = time.perf_counter()
        self.first_batch_s: float | None = None
        self.batches = 0
        self._last_batch_at = self._created
        self._in_flight = None  # outputs of the last step dispatched
        self._stalled: str | None = None
        self.restart_clock()
        # next() runs in this thread, so that the consumer can stop waiting and watch the device meanwhile
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._fetch, daemon=True, name="input-monitor").start()

    def close(self) -> None:
        """Ends the fetching thread once it is free (the iterator itself stays open)."""
        self._requests.put(_STOP)

    def restart_clock(self) -> None:
        self._interval_start, self._interval_batches, self._waited = time.perf_counter(), 0, 0.0

    def interval(self) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self._interval_start, 1e-9)
        figures = {
            "data_wait_fraction": min(self._waited / seconds, 1.0),
            "input_images_per_s": self._interval_batches * self._batch_size / seconds,
        }
        self.restart_clock()
        return figures

    def step_dispatched(self, outputs) -> None:
        self._in_flight = jax.tree.leaves(outputs)

    def _device_idle(self) -> bool:
        return self._in_flight is None or all(leaf.is_ready() for leaf in self._in_flight)

    def __next__(self):
        if self._stalled:
            raise InputStallError(self._stalled)
        start = time.perf_counter()
        idle_since = start if self._device_idle() else None
        self._requests.put(None)
        while True:
            remaining = None if self._timeout_s is None else self._timeout_s - (time.perf_counter() - start)
            poll = remaining if idle_since is not None else min(_IDLE_POLL_S, remaining or _IDLE_POLL_S)
            try:
                batch, error = self._results.get(timeout=None if poll is None else max(poll, 0.0))
                break
            except queue.Empty:
                if idle_since is None and self._device_idle():
                    idle_since = time.perf_counter()
                if remaining is not None and remaining <= 0:
                    self._stalled = self._stall_message()
                    raise InputStallError(self._stalled) from None
        if error is not None:
            raise error
        now = time.perf_counter()
        self._waited += 0.0 if idle_since is None else now - idle_since
        if self.first_batch_s is None:
            self.first_batch_s = now - self._created
        self.batches += 1
        self._interval_batches += 1
        self._last_batch_at = now
        return batch

    def _stall_message(self) -> str:
        since = time.perf_counter() - self._last_batch_at
        return (f"no input batch within {self._timeout_s:g} s (data.batch_timeout_s), waiting on "
                f"{stall_stage(self.batches, self._progress)}; {self.batches} batches came before, the last "
                f"{since:.0f} s ago")

    def _fetch(self) -> None:
        while self._requests.get() is not _STOP:
            try:
                self._results.put((next(self._iterator), None))
            except BaseException as error:  # noqa: BLE001 - StopIteration included: handed to the consumer
                self._results.put((None, error))
