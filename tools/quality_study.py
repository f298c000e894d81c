"""Issue 24's study: do checkpoint averaging, fold ensembles and flip TTA gain, over seeds?

    python tools/quality_study.py --out runs/quality_study            # 3 seeds x 3 folds, ~2 h on 2 CPU cores
    python tools/quality_study.py --out runs/quality_smoke --smoke    # a tiny version, a minute or two

Each seed draws its own synthetic set (`--difficulty 0.9`: 400 training and 400 test images in the full study),
trains 3 folds of the demo config (`siim-jax cv`, resumable: finished folds are reused) and scores, on the test
images at the training size, the raw Dice at threshold 0.5 and the Dice after the post-processing tuned out of
fold (the default grid of `tune`, searched on the model's own validation predictions, or the folds' pooled
out-of-fold predictions for an ensemble) of:
  each fold's latest checkpoint; its top-k average (best k by validation dice_pp); its last-k average (both with
  BatchNorm statistics recomputed); the fold ensemble of the latest checkpoints without and with flip TTA
  (probabilities averaged at the training size). Single models predict with TTA.
Every prediction is cached in `OUT/seed_<s>/predictions/` (a rerun reuses it). Writes `OUT/quality_rows.csv` (one
row per seed and model), `OUT/quality_summary.csv` (mean and std over seeds) and `OUT/quality_summary.png`, and
prints the issue's two conditions as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's siim_jax when run from a checkout

from siim_jax import config_utils  # noqa: E402
from siim_jax.data import layout  # noqa: E402
from siim_jax.data.synthetic import generate  # noqa: E402
from siim_jax.evaluation.cv import fold_dir, run_cv  # noqa: E402
from siim_jax.evaluation.evaluate import labelled_frame  # noqa: E402
from siim_jax.evaluation.oof import FoldPredictions, concatenate, load_oof, oof_metrics, save_oof  # noqa: E402
from siim_jax.evaluation.tune import predict_fold  # noqa: E402
from siim_jax.inference.postprocess import default_grid, grid_search  # noqa: E402
from siim_jax.inference.predictor import Inference  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
    n_train: int
    n_test: int
    image_size: int
    epochs: int
    seeds: tuple[int, ...]
    folds: int
    k: int  # checkpoints averaged
    difficulty: float = 0.9


FULL = Size(n_train=400, n_test=400, image_size=128, epochs=12, seeds=(0, 1, 2), folds=3, k=3)
SMOKE = Size(n_train=24, n_test=12, image_size=32, epochs=3, seeds=(0, 1), folds=2, k=2)
GROUPS = ("fold, latest", "fold, top-k average", "fold, last-k average", "ensemble, TTA off", "ensemble, TTA on")
SELECTIONS = {"latest": {}, "top-k": "average_top", "last-k": "average_last"}


def study_config(data_dir: Path, size: Size, seed: int):
    config = config_utils.load_config(f"demo:{data_dir}")
    config.data.update(image_size=size.image_size, n_folds=size.folds, fold_seed=seed, seed=seed)
    config.train.update(epochs=size.epochs, seed=seed, keep_best=size.k, keep_last=size.k)
    if size is SMOKE:
        config.model.decoder_channels = (16, 8, 8, 8, 8)
        config.train.update(batch_size=4, eval_batch_size=4, eval_every_epochs=1, eval_at_start=False)
        config.optim.warmup_steps = 2
    return config


def cached(path: Path, predict, *args) -> FoldPredictions:
    """`predict(*args)`, saved to `path` the first time and read back from it afterwards."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_oof(path, predict(*args))
    return load_oof(path)


def tuned_dice(tune_on: FoldPredictions, apply_to: FoldPredictions) -> float:
    """Test Dice of the best setting of `tune`'s default grid on `tune_on`, both at the training size."""
    def probs(fold):
        return [prob.astype(np.float32) for prob in fold.probs]

    grid = default_grid(tune_on.resolution[0], class_head=tune_on.class_probs is not None)
    best = grid_search(probs(tune_on), tune_on.truths, grid, tune_on.class_probs)[0][0]
    fixed = {field.name: [getattr(best, field.name)] for field in dataclasses.fields(best)}
    return grid_search(probs(apply_to), apply_to.truths, fixed, apply_to.class_probs)[0][1]


def mean_of_members(members: list[FoldPredictions]) -> FoldPredictions:
    """The members' probabilities and class probabilities averaged per image (same images, same size)."""
    first = members[0]
    probs = [np.mean([m.probs[i].astype(np.float32) for m in members], axis=0) for i in range(len(first.probs))]
    class_probs = None if first.class_probs is None else list(np.mean([m.class_probs for m in members], axis=0))
    return FoldPredictions(first.image_ids, probs, first.truths, class_probs, first.original_sizes)


def seed_rows(out: Path, size: Size, seed: int) -> list[dict]:
    """Trains (or reuses) one seed's folds and scores its models on its test images."""
    root = out / f"seed_{seed}"
    data = root / "data"
    if not (data / layout.STAGE2_CSV).is_file():
        generate(data, n_train=size.n_train, n_test=size.n_test, seed=seed, difficulty=size.difficulty,
                 stage2=True, progress=False)
    config = study_config(data, size, seed)
    workdir = root / "cv"
    run_cv(config, workdir, range(size.folds))
    test_frame = labelled_frame(data / layout.TEST_DIR, data / layout.STAGE2_CSV, None)
    cache = root / "predictions"
    rows, latest = [], {True: [], False: []}

    def predict(fold: int, name: str, frame, tta: bool) -> FoldPredictions:
        selection = {} if name == "latest" else {SELECTIONS[name]: size.k}
        inference = Inference.from_checkpoint(fold_dir(workdir, fold), **selection, tta=tta, progress=False)
        return predict_fold(inference, frame)

    for fold in range(size.folds):
        val_frame = labelled_frame(data / layout.TRAIN_DIR, data / layout.TRAIN_CSV, fold, config.data)
        for name, group in zip(SELECTIONS, GROUPS):
            for tta in (True, False) if name == "latest" else (True,):
                tag = f"fold{fold}_{name}_tta{int(tta)}"
                val = cached(cache / f"{tag}_val.npz", predict, fold, name, val_frame, tta)
                test = cached(cache / f"{tag}_test.npz", predict, fold, name, test_frame, tta)
                if name == "latest":
                    latest[tta].append((val, test))
                if tta:
                    rows.append({"seed": seed, "group": group, "member": fold, "raw_dice": oof_metrics(test)["dice"],
                                 "tuned_dice": tuned_dice(val, test)})
    for tta in (False, True):
        pooled = concatenate([val for val, _ in latest[tta]])
        ensemble = mean_of_members([test for _, test in latest[tta]])
        rows.append({"seed": seed, "group": GROUPS[3 + tta], "member": -1, "raw_dice": oof_metrics(ensemble)["dice"],
                     "tuned_dice": tuned_dice(pooled, ensemble)})
    return rows


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each group's per-seed mean over its members."""
    per_seed = rows.groupby(["group", "seed"])[["raw_dice", "tuned_dice"]].mean()
    summary = per_seed.groupby("group").agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    return summary.reindex(GROUPS)


def paired_gain(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """(mean over seeds of a - b, its standard error); a and b indexed by seed."""
    difference = (a - b).dropna()
    return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(len(difference)))


def conditions(rows: pd.DataFrame) -> list[tuple[str, bool, str]]:
    """The issue's two conditions on the tuned Dice, each (name, passed, the numbers)."""
    tuned = rows.pivot_table(index="seed", columns=["group", "member"], values="tuned_dice")
    members = tuned["fold, latest"]
    best = members.mean().idxmax()
    gain, error = paired_gain(tuned[("ensemble, TTA on", -1)], members[best])
    ensemble = (f"ensemble+TTA beats the best single member (fold {best}) by more than the seeds' standard error",
                gain > error, f"gain {gain:+.4f} ± {error:.4f}")
    per_seed = rows.groupby(["group", "seed"])["tuned_dice"].mean().unstack("group")
    results = {name: paired_gain(per_seed[name], per_seed["fold, latest"]) for name in GROUPS[1:3]}
    averaging = ("an averaging mode does not lose to the latest checkpoint (gain > -standard error)",
                 any(gain > -error for gain, error in results.values()),
                 ", ".join(f"{name}: {gain:+.4f} ± {error:.4f}" for name, (gain, error) in results.items()))
    return [ensemble, averaging]


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    positions = np.arange(len(summary))
    for offset, metric in ((-0.2, "raw_dice"), (0.2, "tuned_dice")):
        axis.bar(positions + offset, summary[f"{metric}_mean"], 0.4, yerr=summary[f"{metric}_std"], capsize=3,
                 label=metric.replace("_", " "))
    axis.set_xticks(positions, summary.index, fontsize="small")
    axis.set_ylim(0, 1)
    axis.set_title("test Dice, mean ± std over seeds")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="study folder (reused when it exists)")
    parser.add_argument("--smoke", action="store_true", help="a tiny version that runs in a minute or two")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    rows = pd.DataFrame([row for seed in size.seeds for row in seed_rows(args.out, size, seed)])
    rows.to_csv(args.out / "quality_rows.csv", index=False)
    summary = summarise(rows)
    summary.to_csv(args.out / "quality_summary.csv")
    plot(summary, args.out / "quality_summary.png")
    print(summary.round(4).to_string())
    for name, passed, numbers in conditions(rows):
        print(f"{'PASS' if passed else 'FAIL'}: {name}: {numbers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
