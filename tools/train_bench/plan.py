"""What a run measures: its settings, its parts (jobs), their order of priority and their time budgets."""

from __future__ import annotations

import dataclasses
import re

STAGE2_IMAGES = 3205
DEFAULT_BATCHES = {512: (32,), 1024: (8,)}
# Usual seconds of each part on one H100/H200 (process start, compilation and timing), from the device README's
# figures (JAX compiles 40-75 s, torch.compile alike; smp eager 364 img/s at 512²x32). A part is skipped when its
# estimate no longer fits in what is left of the budget, and stopped after PART_LIMIT times its estimate.
ESTIMATE_S = {"data": 25.0, "jax": 70.0, "e2e": 20.0, "torch": 15.0, "torch_compile": 60.0, "predict": 60.0}
PART_LIMIT = 2.0
SMOKE_LIMIT_S = 900.0  # a smoke part on a busy CPU; the budget still bounds the whole run


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every part needs besides its own job; sent to the children as JSON."""

    smoke: bool
    steps: int
    warmup: int
    workers: int
    e2e_images: int
    e2e_steps: int
    predict_size: int
    predict_batch: int
    predict_images: int
    cache: str


@dataclasses.dataclass(frozen=True)
class Job:
    kind: str  # 'probe', 'data', 'jax', 'torch' or 'predict'
    model: str = ""  # data: the model that predict loads
    size: int = 0  # data: the training size to prepare
    batch: int = 0
    compile: bool = False  # torch: also torch.compile
    e2e: bool = False  # jax: also the end-to-end run on the input pipeline

    @property
    def case(self) -> tuple[str, int, int]:
        return self.model, self.size, self.batch

    @property
    def label(self) -> str:
        if not self.model:
            return self.kind
        if not self.batch:
            return f"{self.kind} {self.model} {self.size}²"
        extras = "+compile" * self.compile + "+e2e" * self.e2e
        return f"{self.kind}{extras} {self.model} {self.size}²x{self.batch}"

    @property
    def file_stem(self) -> str:
        """The label as a file name: letters, digits, '-' and '_' only (a remote run returns no other names)."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", self.label.replace("+", "-").replace("²", ""))

    def estimate_s(self, smoke: bool) -> float:
        if smoke:
            return 0.0
        extras = ESTIMATE_S["torch_compile"] * self.compile + ESTIMATE_S["e2e"] * self.e2e
        return ESTIMATE_S[self.kind] + extras

    def limit_s(self, smoke: bool) -> float:
        """The longest this part may run (the budget's end may stop it sooner)."""
        return SMOKE_LIMIT_S if smoke else PART_LIMIT * self.estimate_s(smoke)


def batches_for(size: int, override: list[int] | None) -> tuple[int, ...]:
    if override:
        return tuple(override)
    return DEFAULT_BATCHES.get(size, (max(1, 8 * (1024 // size) ** 2),))


def select_cases(models, sizes, batches, every_case: bool) -> tuple[list[tuple], list[tuple]]:
    """(goal cases, other cases): each model's first size at its largest batch; the first model's (or with
    `every_case` every model's) other sizes and batches."""
    goals = [(model, sizes[0], max(batches_for(sizes[0], batches))) for model in models]
    others = [
        (model, size, batch)
        for index, model in enumerate(models)
        if index == 0 or every_case
        for size in sizes
        for batch in batches_for(size, batches)
        if (model, size, batch) not in goals
    ]
    return goals, others


def plan_jobs(args, settings: Settings) -> list[Job]:
    """Parts in priority order: the synthetic data; the first model's goal case (jax with e2e, torch); predict
    (one goal in about 50 s); the other models' goal cases; the remaining cases."""
    goals, others = select_cases(args.models, args.sizes, args.batches, args.every_case)
    compile_torch = not settings.smoke
    jobs = [Job("data", args.models[0], goals[0][1])]
    for index, case in enumerate(goals):
        jobs.append(Job("jax", *case, e2e=index == 0 and not args.skip_e2e))
        jobs.append(Job("torch", *case, compile=compile_torch))
        if index == 0 and not args.skip_predict:
            jobs.append(Job("predict", args.models[0], settings.predict_size, settings.predict_batch))
    for case in others:
        jobs.append(Job("jax", *case))
        jobs.append(Job("torch", *case, compile=compile_torch and args.compile_all))
    return [job for job in jobs if not (args.skip_torch and job.kind == "torch")]
