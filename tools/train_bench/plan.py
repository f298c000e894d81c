"""What a run measures: its settings, its parts (jobs) and their order of priority."""

from __future__ import annotations

import dataclasses

STAGE2_IMAGES = 3205
DEFAULT_BATCHES = {512: (32, 16), 1024: (8,)}
# Usual seconds of each part on one H100 (startup + compile + timing), for the budget; guesses until measured.
ESTIMATE_S = {"jax": 75.0, "e2e": 35.0, "torch": 20.0, "torch_compile": 60.0, "predict": 40.0}


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
    predict_batches: int
    cache: str


@dataclasses.dataclass(frozen=True)
class Job:
    kind: str  # 'probe', 'jax', 'torch' or 'predict'
    model: str = ""
    size: int = 0
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
        extras = "+compile" * self.compile + "+e2e" * self.e2e
        return f"{self.kind}{extras} {self.model} {self.size}²x{self.batch}"

    def estimate_s(self, smoke: bool) -> float:
        if smoke:
            return 0.0
        extras = ESTIMATE_S["torch_compile"] * self.compile + ESTIMATE_S["e2e"] * self.e2e
        return ESTIMATE_S.get(self.kind, 0.0) + extras


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
    """Parts in priority order: the first model's goal case (jax with e2e, torch), predict, the other models'
    goal cases, then the remaining cases."""
    goals, others = select_cases(args.models, args.sizes, args.batches, args.every_case)
    compile_torch = not settings.smoke
    jobs = []
    for index, case in enumerate(goals):
        jobs.append(Job("jax", *case, e2e=index == 0 and not args.skip_e2e))
        jobs.append(Job("torch", *case, compile=compile_torch))
        if index == 0 and not args.skip_predict:
            jobs.append(Job("predict", args.models[0], settings.predict_size, settings.predict_batch))
    for case in others:
        jobs.append(Job("jax", *case))
        jobs.append(Job("torch", *case, compile=compile_torch and args.compile_all))
    return [job for job in jobs if not (args.skip_torch and job.kind == "torch")]
