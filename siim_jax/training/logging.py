"""Metrics you can look at: JSON lines, TensorBoard events (through tensorboardX) and a PNG of the curves.

`MetricWriter(workdir)` appends to `workdir/metrics.jsonl` (one object per write: {"step": ..., "tag": value,
...}), writes the same scalars, and any images and text, to `workdir/tensorboard/events.out.tfevents.*`, and
redraws `workdir/curves.png` from the whole JSON-lines history on `plot()`. Only process 0 writes; elsewhere it
is a no-op.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
import tensorboardX

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"

# ------------------------------------------------------------------------------------------------ the writer


def read_history(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Panels of the curves PNG for tags that do not go by their prefix ('train/...' → 'train', 'val/...' → 'val').
_PANELS = {
    "train/lr": "learning rate",
    "train/grad_norm": "gradient norm",
    "train/images_per_s": "images / s",
    "val/n_images": None,  # not drawn
}


_PANEL_ORDER = ("training loss", "validation", "learning rate", "gradient norm", "images / s")


def _panel(tag: str) -> str | None:
    if tag in _PANELS:
        return _PANELS[tag]
    if "/" not in tag:
        return None
    prefix = tag.split("/")[0]
    return {"train": "training loss", "val": "validation"}.get(prefix, prefix)


def plot_curves(history: list[dict], path: str | Path) -> None:
    """One panel per kind of curve (training loss and its components, validation metrics, learning rate, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, tuple[list, list]]] = {}
    for record in history:
        for tag, value in record.items():
            panel = _panel(tag)
            if panel is None or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue  # 'step', 'epoch', the image count and missing values
            steps, values = series.setdefault(panel, {}).setdefault(tag, ([], []))
            steps.append(record["step"])
            values.append(value)
    if not series:
        return
    columns = min(3, len(series))
    rows = -(-len(series) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for axis in axes.flat[len(series) :]:
        axis.set_visible(False)

    def order(panel):
        return _PANEL_ORDER.index(panel) if panel in _PANEL_ORDER else len(_PANEL_ORDER), panel

    for axis, panel in zip(axes.flat, sorted(series, key=order)):
        lines = series[panel]
        for tag, (steps, values) in sorted(lines.items()):
            axis.plot(steps, values, marker="." if len(steps) < 50 else None, label=tag.split("/", 1)[1])
        axis.set_title(panel)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class MetricWriter:
    """Writes scalars as JSON lines and TensorBoard events, images and text as events, and the curves PNG
    (process 0 only). Each write is flushed, so that a killed run leaves its events readable."""

    def __init__(self, workdir: str | Path, enabled: bool | None = None):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._events = tensorboardX.SummaryWriter(str(self.workdir / TENSORBOARD_DIR)) if self.enabled else None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {tag: float(value) for tag, value in scalars.items()}
        record = {"step": int(step), **{tag: value if math.isfinite(value) else None for tag, value in values.items()}}
        path = self.workdir / METRICS_FILE
        try:
            with open(path, "a") as file:
                file.write(json.dumps(record) + "\n")
        except OSError as error:  # a full disk reports no file name by itself
            raise OSError(error.errno, error.strerror, str(path)) from error
        for tag, value in values.items():
            self._events.add_scalar(tag, value, int(step))
        self._events.flush()

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """An RGB uint8 (H, W, 3) picture."""
        if self.enabled:
            self._events.add_image(tag, rgb, int(step), dataformats="HWC")
            self._events.flush()

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        if self.enabled:
            self._events.add_text(tag, markdown, int(step))
            self._events.flush()

    def plot(self) -> None:
        if self.enabled:
            plot_curves(read_history(self.workdir / METRICS_FILE), self.workdir / CURVES_FILE)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
