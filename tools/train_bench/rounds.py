"""Timing in alternating rounds: every contestant (each JAX variant, torch eager, torch.compile) runs one round in
turn, so that a slow minute of the machine (clocks, a neighbour, the allocator) falls on all of them alike. One
timing per side cannot carry a ratio: the same compiled step timed 548 and 643 images/s minutes apart on the H200.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def log_phase(message: str) -> None:
    """A timestamped line in the part's log, printed as a sub-phase starts (a stopped part shows where it was)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed_loop(run_step: Callable[[], None], finish: Callable[[], None], steps: int) -> float:
    """Seconds for `steps` calls of `run_step`, with one `finish` (a device sync) at the end."""
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    finish()
    return time.perf_counter() - start


@dataclass
class Contestant:
    """One train step to time: `step()` runs one (asynchronously), `sync()` waits for the device."""

    name: str
    images_per_step: int
    step: Callable[[], None]
    sync: Callable[[], None]
    step_s: float = math.nan  # from the warm-up, to size a round
    rates: list[float] = field(default_factory=list)  # images/s of each round

    def warm_up(self, steps: int) -> None:
        self.step_s = timed_loop(self.step, self.sync, max(steps, 1)) / max(steps, 1)

    def round(self, round_s: float) -> None:
        """One timed round of at least `round_s` seconds (as sized from the warm-up), one sync at its end."""
        steps = max(2, math.ceil(round_s / self.step_s))
        seconds = timed_loop(self.step, self.sync, steps)
        self.step_s = seconds / steps
        self.rates.append(self.images_per_step * steps / seconds)


def spread(rates: list[float]) -> dict:
    """The median images/s of the rounds, their extremes and quartiles (the spread a ratio must stand against)."""
    q1, _, q3 = statistics.quantiles(rates, n=4, method="inclusive") if len(rates) > 1 else (rates[0],) * 3
    return {
        "images_per_s": statistics.median(rates),
        "min_images_per_s": min(rates),
        "max_images_per_s": max(rates),
        "iqr_images_per_s": q3 - q1,
        "rounds": list(rates),
    }


def alternate(contestants: list[Contestant], rounds: int, round_s: float, after_round: Callable[[int], None]) -> None:
    """`rounds` rounds; in each, every contestant once, in turn. `after_round(index)` reports what is measured."""
    for index in range(rounds):
        log_phase(f"timed round {index + 1}/{rounds}")
        for contestant in contestants:
            contestant.round(round_s)
        after_round(index)
