"""Metrics you can look at: JSON lines, TensorBoard event files (no TensorFlow needed) and a PNG of the curves.

`MetricWriter(workdir)` appends to `workdir/metrics.jsonl` (one object per write: {"step": ..., "tag": value,
...}), writes scalar summaries to `workdir/tensorboard/events.out.tfevents.*`, and redraws `workdir/curves.png`
from the whole JSON-lines history on `plot()`. Only process 0 writes; elsewhere it is a no-op.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path

import jax

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"

# ----------------------------------------------------------------------------------------- TFRecord framing


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


# ----------------------------------------------------------------------------------- tensorflow.Event protobuf


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def event_bytes(wall_time: float, step: int, scalars: Mapping[str, float] | None = None, file_version: str = "") -> bytes:
    """A serialized `Event` (wall_time = 1, step = 2, file_version = 3, summary = 5) of simple scalar values
    (`Summary.value` = 1; `Value.tag` = 1, `Value.simple_value` = 2)."""
    event = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        event += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items()
        )
        event += _length_delimited(5, values)
    return event


class EventFileWriter:
    """Appends scalar summaries to a TensorBoard event file."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(event_bytes(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._file.write(tfrecord(event_bytes(time.time(), step, values)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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
    return {"train": "training loss", "val": "validation"}.get(tag.split("/")[0], tag.split("/")[0]) if "/" in tag else None


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
    order = lambda panel: (_PANEL_ORDER.index(panel) if panel in _PANEL_ORDER else len(_PANEL_ORDER), panel)
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
    """Writes scalars as JSON lines and TensorBoard events, and the curves PNG (process 0 only)."""

    def __init__(self, workdir: str | Path, enabled: bool | None = None):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._events = EventFileWriter(self.workdir / TENSORBOARD_DIR) if self.enabled else None

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
        self._events.scalars(int(step), values)

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
