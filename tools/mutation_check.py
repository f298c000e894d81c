"""Plants realistic bugs one at a time in a scratch copy of the project and checks that the tests catch each.

Each mutant is one edit (an exact snippet of a source file and its replacement) with the tests of its area. The
project's files (git's tracked and untracked-but-not-ignored ones, as they are on disk) are copied to a temporary
folder, beside a link to `../shared` so that the real-file tests run; the area's tests first pass there unmutated
(the baseline: a kill means nothing otherwise), then each mutant is applied alone and its tests run with `-x`.
A mutant is killed when a test fails, survived when its tests pass. An original snippet that is not in its file
exactly once stops the run before anything is tested, so the list cannot rot silently as the code moves.

    python tools/mutation_check.py                 # every mutant; exits non-zero unless all are killed
    python tools/mutation_check.py --list          # the mutants and their tests
    python tools/mutation_check.py --only tta-not-flipped-back --only grad-summed-over-devices --jobs 2

Not part of CI: a full run takes about a quarter of an hour on two cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    bug: str  # what the edit does, in words
    path: str  # relative to the repository
    original: str  # must occur exactly once in `path`
    mutated: str
    tests: tuple[str, ...]  # pytest node ids (a file, or a test function with all its parameters)


SHARDING_TESTS = ("tests/test_sharding.py", "tests/test_sharding_multihost.py")
ACCUMULATION_TESTS = (
    "tests/test_train_state.py::test_gradient_accumulation_equals_the_whole_batch_without_batch_norm",
    "tests/test_sharding.py",
)
ACCUMULATED_MEAN = "return jax.tree.map(lambda g: g / grad_accum, grads_sum), batch_stats,"
MICRO_BATCH_SCAN = "jax.lax.scan(accumulate, init, (jnp.arange(grad_accum), micro_batches))"
DICE_TESTS = (
    "tests/test_losses.py::test_batch_dice_matches_smp",
    "tests/test_losses.py::test_per_image_dice_matches_smp_image_by_image",
    "tests/test_losses.py::test_per_image_dice_counts_empty_truth_images",
)
DICOM_WINDOW_TESTS = (
    "tests/test_dicom.py::test_16bit_monochrome1_window_matches_pydicom",
    "tests/test_dicom.py::test_voi_lut_function_matches_pydicom",
    "tests/test_dicom.py::test_signed_rescaled_window_matches_pydicom",
)
TRIPLET_TESTS = ("tests/test_postprocess.py::test_triplet_rule", "tests/test_properties.py")
INTEGRITY = "tests/test_evaluation_integrity.py::"
FOLD_TESTS = (INTEGRITY + "test_evaluate_tune_and_oof_use_exactly_the_runs_validation_fold",)
ORIENTATION_TESTS = (INTEGRITY + "test_evaluate_images_keeps_non_square_images_upright",
                     INTEGRITY + "test_predict_fold_and_out_of_fold_files_keep_non_square_truths_upright")
SCORE_TESTS = (INTEGRITY + "test_image_scores_are_the_class_or_top_pixel_probability_and_auc_matches_sklearn",)
UNREADABLE_TESTS = (INTEGRITY + "test_evaluate_images_keeps_non_square_images_upright",
                    INTEGRITY + "test_unreadable_labelled_images_score_as_empty_predictions_in_tune_and_ensembles")

MUTANTS = (
    Mutant(
        "grad-summed-over-devices", "sharding", "the gradient summed over the devices where their mean belongs",
        "siim_jax/training/state.py",
        "        grads, batch_stats, metrics = gradients(state.params, state.batch_stats, batch, key)\n",
        "        grads, batch_stats, metrics = gradients(state.params, state.batch_stats, batch, key)\n"
        "        grads = jax.tree.map(lambda g: g * mesh.size, grads)\n",
        SHARDING_TESTS,
    ),
    Mutant(
        "accum-sum-not-mean", "accumulation", "micro-batch gradients summed, the division by grad_accum missing",
        "siim_jax/training/state.py", ACCUMULATED_MEAN,
        "return grads_sum, batch_stats,",
        ACCUMULATION_TESTS,
    ),
    Mutant(
        "accum-last-micro-batch-dropped", "accumulation", "the scan stops one micro-batch short",
        "siim_jax/training/state.py", MICRO_BATCH_SCAN,
        "jax.lax.scan(accumulate, init, (jnp.arange(grad_accum - 1), jax.tree.map(lambda x: x[:-1], micro_batches)))",
        ACCUMULATION_TESTS,
    ),
    Mutant(
        "bn-biased-running-var", "BatchNorm", "the running variance updated with the biased batch variance",
        "siim_jax/models/layers.py",
        "unbiased = var * (count / max(count - 1, 1))",
        "unbiased = var",
        ("tests/test_models.py::test_batchnorm_keeps_pytorchs_unbiased_running_variance",),
    ),
    Mutant(
        "bn-epsilon-1e-3", "BatchNorm", "BatchNorm's epsilon 1e-3 (Keras's) instead of PyTorch's 1e-5",
        "siim_jax/models/layers.py",
        "momentum: float = 0.9, epsilon: float = 1e-5",
        "momentum: float = 0.9, epsilon: float = 1e-3",
        ("tests/test_predict_parity.py",),
    ),
    Mutant(
        "convert-kernel-axes-swapped", "conversion", "PyTorch's (O, I, kH, kW) kernels laid out (kW, kH, I, O)",
        "siim_jax/models/convert.py",
        "weight.transpose(2, 3, 1, 0)",
        "weight.transpose(3, 2, 1, 0)",
        ("tests/test_predict_parity.py",),
    ),
    Mutant(
        "focal-alpha-on-negatives", "loss: focal", "focal alpha weights the negative pixels instead of the positives",
        "siim_jax/training/losses.py",
        "alpha=alpha, gamma=gamma))",
        "alpha=None if alpha is None else 1.0 - alpha, gamma=gamma))",
        ("tests/test_losses.py::test_focal_matches_torchvision", "tests/test_losses.py::test_focal_matches_smp"),
    ),
    Mutant(
        "dice-smooth-only-in-denominator", "loss: Dice", "the smoothing term dropped from the Dice numerator",
        "siim_jax/training/losses.py",
        "return 1.0 - (numerator + smooth) / (denominator + smooth)",
        "return 1.0 - numerator / (denominator + smooth)",
        DICE_TESTS,
    ),
    Mutant(
        "dice-per-image-ignored", "loss: Dice", "per-image Dice computed over the whole batch",
        "siim_jax/training/losses.py",
        "sums = _per_image_sum if per_image else jnp.sum",
        "sums = jnp.sum",
        DICE_TESTS,
    ),
    Mutant(
        "bce-summed-not-averaged", "loss: BCE", "BCE summed over pixels instead of averaged",
        "siim_jax/training/losses.py",
        "return jnp.mean(optax.sigmoid_binary_cross_entropy(",
        "return jnp.sum(optax.sigmoid_binary_cross_entropy(",
        ("tests/test_losses.py::test_bce_matches_torch",),
    ),
    Mutant(
        "wsd-class-weights-swapped", "loss: weighted soft Dice", "v2 weights the background and v1 the pneumothorax",
        "siim_jax/training/losses.py",
        "weights = v1 + (v2 - v1) * targets",
        "weights = v2 + (v1 - v2) * targets",
        ("tests/test_losses.py::test_weighted_soft_dice_matches_paper_formula",),
    ),
    Mutant(
        "loss-cls-weight-ignored", "loss: composition", "the classification head's loss added with weight 1",
        "siim_jax/training/losses.py",
        "total = sum(float(total_weights[name]) * value",
        "total = sum(float(weights.get(name, 1.0)) * value",
        ("tests/test_losses.py::test_mixed_loss_is_the_hand_weighted_sum_of_references",),
    ),
    Mutant(
        "rle-standard-zero-based", "RLE", "standard RLE written with 0-based starts",
        "siim_jax/data/rle.py",
        "return _join(starts + 1, ends - starts)",
        "return _join(starts, ends - starts)",
        ("tests/test_rle.py", "tests/test_properties.py"),
    ),
    Mutant(
        "rle-row-major", "RLE", "masks encoded row by row instead of down the columns",
        "siim_jax/data/rle.py",
        "flat = mask.astype(bool, copy=False).T.ravel()",
        "flat = mask.astype(bool, copy=False).ravel()",
        ("tests/test_rle.py", "tests/test_properties.py"),
    ),
    Mutant(
        "dicom-monochrome1-not-inverted", "DICOM windowing", "MONOCHROME1 left uninverted (the name misspelt)",
        "siim_jax/data/dicom.py",
        'if _text(ds, "PhotometricInterpretation") == "MONOCHROME1":\n        pixels = 255 - pixels',
        'if _text(ds, "PhotometricInterpretation") == "MONOCHROME 1":\n        pixels = 255 - pixels',
        ("tests/test_dicom.py::test_monochrome1_is_inverted", *DICOM_WINDOW_TESTS),
    ),
    Mutant(
        "dicom-window-stretched-to-values", "DICOM windowing",
        "windowed values scaled from their own range, not from the window's output range",
        "siim_jax/data/dicom.py",
        "return apply_windowing(values, ds), float(low), float(high)",
        "windowed = apply_windowing(values, ds)\n        return windowed, float(windowed.min()), float(windowed.max())",
        DICOM_WINDOW_TESTS,
    ),
    Mutant(
        "resample-epoch-not-in-seed", "resampling", "every epoch draws the same negatives: the seed lacks the epoch",
        "siim_jax/data/pipeline.py",
        "rng = np.random.default_rng([seed, _SAMPLE_STREAM, epoch])",
        "rng = np.random.default_rng([seed, _SAMPLE_STREAM])",
        ("tests/test_pipeline.py::test_draws_repeat_per_seed_and_epoch_and_change_across_epochs",),
    ),
    Mutant(
        "ckpt-best-ranked-worst-first", "checkpoint restore", "best checkpoints ranked lowest Dice first",
        "siim_jax/training/checkpoints.py",
        "key=lambda item: (-item[0], item[1])",
        "key=lambda item: (item[0], item[1])",
        ("tests/test_checkpoints.py::test_ranks_by_postprocessed_dice_and_falls_back_for_older_checkpoints",
         "tests/test_checkpoints.py::test_restore_for_inference_from_a_training_run"),
    ),
    Mutant(
        "ckpt-data-iterator-not-restored", "checkpoint restore", "a restored data iterator starts again at batch 0",
        "siim_jax/data/pipeline.py",
        "self._iterator = self._start(self._batches[self._position:])",
        "self._iterator = self._start(self._batches)",
        ("tests/test_pipeline.py::test_restored_iterator_state_continues_with_the_next_batches",
         "tests/test_pipeline.py::test_a_position_saved_under_one_worker_count_resumes_under_another"),
    ),
    Mutant(
        "resume-config-unchecked", "checkpoint restore", "a run resumes under a changed batch size and schedule",
        "siim_jax/training/loop.py",
        "            check_resumable(checkpoints.restore_config(start), config, workdir)\n",
        "",
        ("tests/test_train.py::test_resuming_after_sigterm_reaches_the_uninterrupted_weights",),
    ),
    Mutant(
        "train-batches-not-resumed", "checkpoint restore", "a resumed run starts its batches at the first one",
        "siim_jax/data/pipeline.py",
        "self._iterator = start(batches[position:])",
        "self._iterator = start(batches)",
        ("tests/test_train.py::test_resuming_after_sigterm_reaches_the_uninterrupted_weights",
         "tests/test_pipeline.py::test_a_position_saved_under_one_worker_count_resumes_under_another"),
    ),
    Mutant(
        "pp-min-area-strict", "post-processing", "the triplet rule needs more than min_area pixels, not at least",
        "siim_jax/inference/postprocess.py",
        "np.count_nonzero(prob > self.top_threshold) >= self.min_area",
        "np.count_nonzero(prob > self.top_threshold) > self.min_area",
        TRIPLET_TESTS,
    ),
    Mutant(
        "pp-triplet-counts-at-bottom", "post-processing", "the triplet rule counts pixels above the bottom threshold",
        "siim_jax/inference/postprocess.py",
        "np.count_nonzero(prob > self.top_threshold) >= self.min_area",
        "np.count_nonzero(prob > self.bottom_threshold) >= self.min_area",
        TRIPLET_TESTS,
    ),
    Mutant(
        "metrics-empty-dice-zero", "metrics", "Dice of an empty prediction on an empty truth scored 0",
        "siim_jax/metrics.py",
        "return np.where(total == 0, 1.0, 2.0 * intersection",
        "return np.where(total == 0, 0.0, 2.0 * intersection",
        ("tests/test_metrics.py",),
    ),
    Mutant(
        "tta-not-flipped-back", "TTA", "the mirrored prediction averaged without mirroring it back",
        "siim_jax/inference/predictor.py",
        "probs = (plain + mirrored[:, :, ::-1]) / 2",
        "probs = (plain + mirrored) / 2",
        ("tests/test_predict.py::test_hflip_tta_averages_prediction_and_mirrored_prediction",),
    ),
    Mutant(
        "folds-seed-ignored", "folds", "evaluate and tune draw the folds with seed 0, not the run's data.fold_seed",
        "siim_jax/evaluation/evaluate.py",
        "seed=fold_seed, strict=False",
        "seed=0, strict=False",
        FOLD_TESTS,
    ),
    Mutant(
        "folds-dropped-with-data-flags", "folds", "given --data and --labels, the run's n_folds and fold_seed are lost",
        "siim_jax/evaluation/evaluate.py",
        "        return Path(data), Path(labels), data_config",
        "        return Path(data), Path(labels), None",
        FOLD_TESTS,
    ),
    Mutant(
        "oof-default-folds", "folds", "out-of-fold images drawn from the default folds, not the run's",
        "siim_jax/evaluation/cv.py",
        "labelled_frame(dicom_dir, labels, fold, config.data)",
        "labelled_frame(dicom_dir, labels, fold)",
        FOLD_TESTS,
    ),
    Mutant(
        "pred-resized-to-height-width", "orientation", "probabilities resized to (height, width) as cv2's dsize",
        "siim_jax/inference/predictor.py",
        "return cv2.resize(self.prob, (width, height), interpolation=cv2.INTER_LINEAR)",
        "return cv2.resize(self.prob, (height, width), interpolation=cv2.INTER_LINEAR)",
        ORIENTATION_TESTS,
    ),
    Mutant(
        "tune-truth-decoded-transposed", "orientation", "tune's truth decoded at (width, height)",
        "siim_jax/evaluation/tune.py",
        "truth = merged_mask(label_row, prediction.original_size).view(np.uint8)",
        "truth = merged_mask(label_row, prediction.original_size[::-1]).view(np.uint8)",
        ORIENTATION_TESTS,
    ),
    Mutant(
        "evaluate-truth-decoded-transposed", "orientation", "evaluate's truth decoded at (width, height)",
        "siim_jax/evaluation/evaluate.py",
        "truth = merged_mask(label_row, prediction.original_size)\n",
        "truth = merged_mask(label_row, prediction.original_size[::-1])\n",
        ORIENTATION_TESTS,
    ),
    Mutant(
        "oof-truth-transposed", "orientation", "the CV summary compares each prediction with its transposed truth",
        "siim_jax/evaluation/oof.py",
        'stats["intersection"].append(np.count_nonzero(predicted & truth))',
        'stats["intersection"].append(np.count_nonzero(predicted & truth.T))',
        ORIENTATION_TESTS,
    ),
    Mutant(
        "score-mean-not-max", "image scores", "without a class head, the score is the mean pixel probability",
        "siim_jax/evaluation/evaluate.py",
        "return 0.0 if prediction.prob is None else float(prediction.prob.max())",
        "return 0.0 if prediction.prob is None else float(prediction.prob.mean())",
        SCORE_TESTS,
    ),
    Mutant(
        "score-ignores-class-head", "image scores", "the score is the top pixel probability even with a class head",
        "siim_jax/evaluation/evaluate.py",
        "    if prediction.class_prob is not None:\n        return prediction.class_prob\n    return 0.0",
        "    return 0.0",
        SCORE_TESTS,
    ),
    Mutant(
        "oof-score-mean-not-max", "image scores", "the CV summary scores an image by its mean pixel probability",
        "siim_jax/evaluation/oof.py",
        "else float(prob.max()))",
        "else float(prob.mean()))",
        SCORE_TESTS,
    ),
    Mutant(
        "ensemble-class-unweighted", "ensembles", "members' class probabilities averaged without their weights",
        "siim_jax/inference/ensemble.py",
        "weighted[0] += member.weight * prediction.class_prob\n" + " " * 28 + "weighted[1] += member.weight",
        "weighted[0] += prediction.class_prob\n" + " " * 28 + "weighted[1] += 1.0",
        (INTEGRITY + "test_ensemble_class_probability_is_the_weighted_mean_of_the_members_with_a_head",),
    ),
    Mutant(
        "pooled-class-misaligned", "ensembles", "pooled runs' class probabilities taken by position, not by ImageId",
        "siim_jax/evaluation/oof.py",
        "run.class_probs[position[i]]",
        "run.class_probs[i]",
        (INTEGRITY + "test_pooled_oof_class_probabilities_follow_each_runs_own_image_order",),
    ),
    Mutant(
        "evaluate-unreadable-as-negative", "unreadable images", "an unreadable image's true area counted as 0",
        "siim_jax/evaluation/evaluate.py",
        'rows.append((image_id, 0, 0, int(label_row["area"]), score))',
        "rows.append((image_id, 0, 0, 0, score))",
        UNREADABLE_TESTS,
    ),
    Mutant(
        "tune-unreadable-as-negative", "unreadable images", "tune scores every unreadable image against an empty truth",
        "siim_jax/evaluation/tune.py",
        "fold.truths[position] = np.full((size, size), positive)",
        "fold.truths[position] = np.zeros((size, size), bool)",
        UNREADABLE_TESTS,
    ),
    Mutant(
        "cv-interrupted-fold-restarted", "CV resume", "an unfinished fold is trained from scratch, not resumed",
        "siim_jax/evaluation/cv.py",
        "result = train_and_evaluate(fold_config(config, fold), fold_dir(workdir, fold))",
        "result = train_and_evaluate(fold_config(config, fold), fold_dir(workdir, fold), resume=False)",
        ("tests/test_reliability_kill.py::test_cv_resumes_a_killed_fold_writes_its_oof_file_and_skips_the_finished_fold",),
    ),
    Mutant(
        "wheel-misses-a-subpackage", "packaging", "the packages listed by hand, siim_jax.data.synthetic forgotten",
        "pyproject.toml",
        '"siim_jax.data", "siim_jax.data.synthetic",',
        '"siim_jax.data",',
        ("tests/test_packaging.py",),
    ),
    Mutant(
        "jpeg-fast-path-ignores-window", "DICOM windowing", "an 8-bit JPEG's window left unapplied",
        "siim_jax/data/dicom.py",
        '("RescaleSlope", "ModalityLUTSequence", "WindowCenter")',
        '("RescaleSlope", "ModalityLUTSequence")',
        ("tests/test_dicom.py::test_8bit_jpeg_fast_path_applies_the_files_transforms_as_pydicom_does",),
    ),
    Mutant(
        "jpeg-fast-path-ignores-modality-lut", "DICOM windowing", "an 8-bit JPEG's modality LUT left unapplied",
        "siim_jax/data/dicom.py",
        '("RescaleSlope", "ModalityLUTSequence", "WindowCenter")',
        '("RescaleSlope", "WindowCenter")',
        ("tests/test_dicom.py::test_8bit_jpeg_fast_path_applies_the_files_transforms_as_pydicom_does",),
    ),
    Mutant(
        "voi-lut-widened-from-zero", "DICOM windowing", "an 8-bit VOI LUT widened with its first mapped value lost",
        "siim_jax/data/dicom.py",
        "[entries, first, 16])",
        "[entries, 0, 16])",
        ("tests/test_dicom.py::test_voi_lut_whose_first_mapped_value_is_not_zero_matches_pydicom",),
    ),
    Mutant(
        "batch-rows-compacted", "prediction", "a batch's probabilities indexed among its readable rows only",
        "siim_jax/inference/predictor.py",
        "            yield probs[row], class_prob,",
        '            yield probs[np.count_nonzero(batch["valid"][:row])], class_prob,',
        ("tests/test_predict.py::test_unreadable_or_missing_dicom_gives_empty_row_and_warning",),
    ),
    Mutant(
        "bfloat16-weights", "prediction", "bfloat16 inference casts the parameters and statistics too",
        "siim_jax/inference/predictor.py",
        "nnx.update(twin, nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))",
        "nnx.update(twin, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Any(nnx.Param, "
        "nnx.BatchStat))))",
        ("tests/test_predict.py::test_bfloat16_inference_keeps_the_weights_and_stays_close_to_float32",),
    ),
    Mutant(
        "logging-drops-zeros", "logging", "metrics whose value is 0 are not written (a falsy test meant for None)",
        "siim_jax/training/logging.py",
        "values = {tag: float(value) for tag, value in scalars.items()}",
        "values = {tag: float(value) for tag, value in scalars.items() if value}",
        ("tests/test_train_logging.py::test_every_tag_written_is_read_back_at_its_step",),
    ),
)


@dataclasses.dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    verdict: str  # 'killed', 'survived' or 'error'
    seconds: float
    detail: str  # the first failing test, or why the run says nothing


def check_snippets(root: Path, mutants: Sequence[Mutant]) -> list[str]:
    """One problem per mutant whose original snippet is not in its file exactly once."""
    problems = []
    for mutant in mutants:
        path = root / mutant.path
        count = path.read_text().count(mutant.original) if path.is_file() else -1
        if count != 1:
            where = "file missing" if count < 0 else f"found {count} times"
            problems.append(f"{mutant.name}: original snippet in {mutant.path}: {where}")
    return problems


def project_files(repo: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, check=True, capture_output=True, text=True,
    ).stdout
    return [name for name in listed.split("\0") if name and (repo / name).is_file()]


def scratch_copy(repo: Path, parent: Path) -> Path:
    """`parent/<repo name>`, a copy of the project's files, with `parent/shared` linking to the repo's `../shared`."""
    root = parent / repo.name
    for name in project_files(repo):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, root / name)
    shared = repo.parent / "shared"
    if shared.is_dir():
        (parent / "shared").symlink_to(shared, target_is_directory=True)
    return root


def run_pytest(root: Path, tests: Sequence[str], stop_at_first: bool) -> tuple[int | None, float, str]:
    """(exit code, seconds, output) of one pytest process on `tests` in `root`; exit code None on a timeout."""
    # No bytecode: a mutated file and its restored original can share a size and an mtime second, and Python
    # would then run the other's cached bytecode.
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *tests]
    if stop_at_first:
        command.insert(4, "-x")
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - start, f"timed out after {TEST_TIMEOUT_S} s"
    return done.returncode, time.monotonic() - start, done.stdout + done.stderr


def first_failure(output: str) -> str:
    """The node id of the first FAILED or ERROR line of pytest's short summary."""
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return match.group(1) if match else "(no failing test named)"


@contextlib.contextmanager
def mutated(root: Path, mutant: Mutant) -> Iterator[None]:
    path = root / mutant.path
    original = path.read_text()
    path.write_text(original.replace(mutant.original, mutant.mutated, 1))
    try:
        yield
    finally:
        path.write_text(original)



def check(root: Path, mutant: Mutant) -> Outcome:
    with mutated(root, mutant):
        code, seconds, output = run_pytest(root, mutant.tests, stop_at_first=True)
    if code == 0:
        return Outcome(mutant, "survived", seconds, "its tests pass")
    if code in (1, 2):  # tests failed, or collection failed: the mutant broke an import (the baseline collected)
        return Outcome(mutant, "killed", seconds, first_failure(output))
    reason = output if code is None else f"pytest exit code {code}: {output.strip().splitlines()[-1:]}"
    return Outcome(mutant, "error", seconds, reason)


def baseline(root: Path, mutants: Sequence[Mutant]) -> None:
    """Runs every selected test once on the unmutated copy; exits when any fails."""
    tests = list(dict.fromkeys(test for mutant in mutants for test in mutant.tests))
    code, seconds, output = run_pytest(root, tests, stop_at_first=False)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    print(f"baseline (unmutated, {len(tests)} selections): {summary} in {seconds:.0f} s", flush=True)
    if code != 0:
        print(output, file=sys.stderr)
        sys.exit("mutation_check: the unmutated project fails its area tests; fix those first")


def run_all(repo: Path, mutants: Sequence[Mutant], jobs: int, run_baseline: bool) -> list[Outcome]:
    with tempfile.TemporaryDirectory(prefix="siim-mutants-") as scratch:
        roots = queue.Queue()
        for index in range(jobs):
            (Path(scratch) / str(index)).mkdir()
            roots.put(scratch_copy(repo, Path(scratch) / str(index)))
        if run_baseline:
            root = roots.get()
            baseline(root, mutants)
            roots.put(root)

        def check_on_free_copy(mutant: Mutant) -> Outcome:
            root = roots.get()
            try:
                outcome = check(root, mutant)
            finally:
                roots.put(root)
            print(f"{outcome.verdict:8} {mutant.name} ({outcome.seconds:.0f} s): {outcome.detail}", flush=True)
            return outcome

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(check_on_free_copy, mutants))


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once, each in its own copy")
    parser.add_argument("--tests", action="append", metavar="NODE",
                        help="run these tests instead of each mutant's own (repeatable): shows what another "
                             "selection, such as the tests before a mutant's own were written, misses")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the run of the unmutated tests (only when it is known to pass)")
    args = parser.parse_args(argv)

    known = {mutant.name for mutant in MUTANTS}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        parser.error(f"unknown mutants {unknown}; known: {sorted(known)}")
    mutants = [mutant for mutant in MUTANTS if not args.only or mutant.name in args.only]
    if args.tests:
        mutants = [dataclasses.replace(mutant, tests=tuple(args.tests)) for mutant in mutants]
    if args.list:
        print(table([("name", "area", "file", "bug", "tests")]
                    + [(m.name, m.area, m.path, m.bug, " ".join(m.tests)) for m in mutants]))
        return 0
    problems = check_snippets(REPO, mutants)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print("mutation_check: update these snippets to the code as it is now", file=sys.stderr)
        return 2

    outcomes = run_all(REPO, mutants, max(1, args.jobs), args.baseline)
    print()
    print(table([("mutant", "area", "result", "seconds", "killed by")]
                + [(o.mutant.name, o.mutant.area, o.verdict, f"{o.seconds:.0f}",
                    o.detail if o.verdict == "killed" else "-") for o in outcomes]))
    counts = {verdict: sum(o.verdict == verdict for o in outcomes) for verdict in ("killed", "survived", "error")}
    print(f"\n{counts['killed']} killed, {counts['survived']} survived, {counts['error']} errors "
          f"of {len(outcomes)} mutants")
    for outcome in outcomes:
        if outcome.verdict == "error":
            print(f"error: {outcome.mutant.name}: {outcome.detail}", file=sys.stderr)
    return 0 if counts["killed"] == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
