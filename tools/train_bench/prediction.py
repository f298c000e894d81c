"""The prediction part: what `siim-jax predict` runs (`Inference.from_checkpoint`, then `predict_submission`:
DICOM decoding, the jitted model with hflip TTA, post-processing, RLE and the CSV), on the synthetic 1024² test
DICOMs, projected to the 3,205 images of stage 2.

Three calls in one process: the first `small` images (compilation included), the same again, then all the test
images. The last two give a straight line, seconds = fixed + per_image x images, through the per-call costs
(pipeline and worker start, the last batch's latency) and the per-image cost. A stage-2 run is projected as the
process start (imports and model restore) plus that line at 3,205 images: a run whose compiled program is
already in the persistent compilation cache. `compile_s` (the first call less the second) is what a cold cache
adds.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from train_bench.data import model_dir, synthetic_root
from train_bench.measure import device_report, gigabytes, peak_device_bytes
from train_bench.plan import STAGE2_IMAGES, Job, Settings


def timed_submission(inference, items, out: Path) -> float:
    """Seconds for `predict_submission` of `items` into `out`, checked to hold one row per item."""
    from siim_jax.inference.submission import predict_submission

    start = time.perf_counter()
    predict_submission(inference, items, out)
    seconds = time.perf_counter() - start
    rows = len(out.read_text().splitlines()) - 1  # less the header
    if rows != len(items):
        raise RuntimeError(f"{out} holds {rows} rows for {len(items)} images")
    return seconds


def run_predict(job: Job, settings: Settings, report) -> dict:
    from siim_jax.data import layout

    items_dir = synthetic_root(settings) / layout.TEST_DIR
    checkpoint = model_dir(settings, job.model)
    if not (checkpoint / "model_config.json").is_file():  # written last by model_io.save_model
        raise FileNotFoundError(f"{checkpoint}: no model directory (the data part writes it, and did not finish)")
    start = time.perf_counter()
    from siim_jax.inference.predictor import Inference
    from siim_jax.inference.submission import submission_items

    imported = time.perf_counter()
    inference = Inference.from_checkpoint(checkpoint, image_size=job.size, batch_size=job.batch,
                                          tta=True, workers=settings.workers, progress=False)  # fmt: skip
    restored = time.perf_counter()
    items = submission_items(items_dir)
    small = min(2 * job.batch, len(items) // 2)
    with tempfile.TemporaryDirectory() as folder:
        cold_s = timed_submission(inference, items[:small], Path(folder) / "cold.csv")
        small_s = timed_submission(inference, items[:small], Path(folder) / "small.csv")
        large_s = timed_submission(inference, items, Path(folder) / "large.csv")
    per_image_s = (large_s - small_s) / (len(items) - small)
    if per_image_s <= 0:  # timing noise on a busy machine: charge the whole large call per image
        per_image_s = large_s / len(items)
    startup_s = restored - start
    fixed_s = startup_s + small_s - per_image_s * small
    return {
        **device_report(),
        "images_per_s": 1 / per_image_s,
        "seconds_per_image": per_image_s,
        "fixed_s": fixed_s,
        "stage2_projected_s": fixed_s + STAGE2_IMAGES * per_image_s,
        "startup_s": startup_s,
        "import_s": imported - start,
        "compile_s": cold_s - small_s,
        "small_images": small,
        "small_s": small_s,
        "large_images": len(items),
        "large_s": large_s,
        "workers": settings.workers,
        "peak_gb": gigabytes(peak_device_bytes()),
    }
