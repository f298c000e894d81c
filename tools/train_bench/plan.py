"""What a run measures: its settings, its parts (jobs), their order of priority and their time budgets."""

from __future__ import annotations

import dataclasses
import re

STAGE2_IMAGES = 3205
DEFAULT_BATCHES = {512: (32,), 1024: (8,)}
# Seconds of each part and phase on one H200, measured in the first GPU run (shared/gpu-runs/h200-2026-12-04:
# data 35 s, the jax UNet-ResNet50 step compiled in 75 s and UNet-SE-ResNeXt50 in 41 s, torch eager 17 s to its
# first step and torch.compile 55 s more, together 89 s with the warm-ups). `start` is a child's process start and
# imports; the SE-ResNeXt50 compile is planned at 60 s, between its measured 41 s and ResNet50's 75 s. A part is
# skipped when its estimate no longer fits in what is left of the budget, and stopped after PART_LIMIT times it.
ESTIMATE_S = {"probe": 10.0, "data": 35.0, "start": 15.0, "torch_eager": 20.0, "torch_compile": 70.0,
              "e2e": 35.0, "predict": 60.0, "profile": 45.0}  # fmt: skip
JAX_COMPILE_S = {"resnet50": 75.0, "se_resnext50_32x4d": 60.0}
OTHER_COMPILE_S = 75.0  # a model not measured yet
ROUND_OVERHEAD_S = 0.5  # a round's sync and its last step past round_s
PART_LIMIT = 2.0
SMOKE_LIMIT_S = 900.0  # a smoke part on a busy CPU; the budget still bounds the whole run


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every part needs besides its own job; sent to the children as JSON."""

    smoke: bool
    steps: int  # profile: traced steps
    warmup: int
    workers: int
    e2e_images: int
    e2e_steps: int
    predict_size: int
    predict_batch: int
    predict_images: int
    cache: str
    rounds: int = 3  # alternating timed rounds per contestant
    round_s: float = 2.0  # seconds of each round (at least)
    logs: str = ""  # the folder packed into the archive (a part's files besides its log go here)


@dataclasses.dataclass(frozen=True)
class Job:
    kind: str  # 'probe', 'data', 'duel', 'e2e', 'predict' or 'profile'
    model: str = ""  # data: the model that predict loads
    size: int = 0  # data: the training size to prepare
    batch: int = 0
    variants: tuple[str, ...] = ("baseline",)  # duel: the jax variants (train_bench/variants.py)
    torch_modes: tuple[str, ...] = ()  # duel: 'eager', 'compile'
    limit_s: float = 0.0  # set when the part starts: how long it may run

    @property
    def case(self) -> tuple[str, int, int]:
        return self.model, self.size, self.batch

    @property
    def label(self) -> str:
        if not self.model:
            return self.kind
        if not self.batch:
            return f"{self.kind} {self.model} {self.size}²"
        extras = "".join(f"+{mode}" for mode in self.torch_modes)
        count = len(self.variants)
        extras += f"+{count}variants" if count > 1 else ""
        return f"{self.kind}{extras} {self.model} {self.size}²x{self.batch}"

    @property
    def file_stem(self) -> str:
        """The label as a file name: letters, digits, '-' and '_' only (a remote run returns no other names)."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", self.label.replace("+", "-").replace("²", ""))

    def estimate_s(self, settings: Settings) -> float:
        """Usual seconds on the H200 (0 in a smoke run: its parts are bounded by SMOKE_LIMIT_S and the budget)."""
        if settings.smoke:
            return 0.0
        if self.kind != "duel":
            return ESTIMATE_S[self.kind]
        compile_s = JAX_COMPILE_S.get(self.model, OTHER_COMPILE_S)
        contestants = len(self.variants) + len(self.torch_modes)
        rounds = settings.rounds * contestants * (settings.round_s + ROUND_OVERHEAD_S)
        torch = sum(ESTIMATE_S[f"torch_{mode}"] for mode in self.torch_modes)
        return ESTIMATE_S["start"] + compile_s * len(self.variants) + torch + rounds

    def limit_s_for(self, settings: Settings, remaining_s: float, later: list[Job]) -> float:
        """How long this part may run: twice its estimate; a duel of several variants shares what is left, less
        the estimates of the later parts that are not duels, with the later duels (it drops the variants that do
        not fit; variants.py ranks them)."""
        if settings.smoke:
            return min(remaining_s, SMOKE_LIMIT_S)
        if self.kind == "duel" and len(self.variants) > 1:
            reserved = sum(job.estimate_s(settings) for job in later if job.kind != "duel")
            return (remaining_s - reserved) / (1 + sum(job.kind == "duel" for job in later))
        return min(remaining_s, PART_LIMIT * self.estimate_s(settings))


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


def torch_modes(args, settings: Settings, first: bool) -> tuple[str, ...]:
    """torch.compile (GPU only) for every goal case; eager too for the first model, or with --eager-all, and on
    the CPU (where it is the only mode). A variants run measures the variants against torch.compile only."""
    if args.skip_torch:
        return ()
    if settings.smoke:
        return ("eager",)
    eager = (first or args.eager_all) and not args.variant_names[1:]
    return ("eager", "compile") if eager else ("compile",)


def plan_jobs(args, settings: Settings) -> list[Job]:
    """Parts in priority order: the synthetic data; each model's goal case (the duel of the jax step against
    torch); the end-to-end run of the first model; predict; the other cases; the profile. A variants run (more
    than the baseline) measures the duels only, unless it names --e2e / --predict parts explicitly."""
    goals, others = select_cases(args.models, args.sizes, args.batches, args.every_case)
    variants = tuple(args.variant_names)
    first_model, first_size = args.models[0], goals[0][1]
    jobs = [
        Job("duel", *case, variants=variants, torch_modes=torch_modes(args, settings, index == 0))
        for index, case in enumerate(goals)
    ]
    if args.e2e:
        jobs.append(Job("e2e", *goals[0]))
    if args.predict:
        jobs.append(Job("predict", first_model, settings.predict_size, settings.predict_batch))
    if args.e2e or args.predict:
        jobs.insert(0, Job("data", first_model, first_size))
    jobs += [Job("duel", *case, torch_modes=torch_modes(args, settings, False)) for case in others]
    if args.profile:
        jobs.append(Job("profile", *goals[0]))
    return jobs
