"""The metric writer: JSON lines, TensorBoard events read back by tensorboard's own reader, and the curves PNG."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from siim_jax.training.logging import (
    CURVES_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricWriter,
)


def read_events(directory) -> event_accumulator.EventAccumulator:
    """Everything tensorboard would show from `directory` (no sampling: every value kept)."""
    keep_all = {kind: 0 for kind in (event_accumulator.SCALARS, event_accumulator.IMAGES, event_accumulator.TENSORS)}
    return event_accumulator.EventAccumulator(str(directory), size_guidance=keep_all).Reload()


def test_writer_outputs(tmp_path):
    writer = MetricWriter(tmp_path, enabled=True)
    writer.text("config", "lr: 0.001")
    writer.write(10, {"train/loss": 0.5, "train/lr": 1e-3})
    writer.write(10, {"val/dice": 0.75, "val/auc": float("nan"), "epoch": 1})
    writer.image("val/contours", np.full((6, 8, 3), [255, 0, 0], np.uint8), 10)
    writer.write(300, {"train/loss": 0.25, "train/lr": 5e-4})
    writer.plot()
    writer.close()

    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert lines[1] == {"step": 10, "val/dice": 0.75, "val/auc": None, "epoch": 1.0}
    assert (tmp_path / CURVES_FILE).read_bytes().startswith(b"\x89PNG")

    events = read_events(tmp_path / TENSORBOARD_DIR)
    for line in lines:
        for tag, value in line.items():
            if tag != "step":  # metrics.jsonl writes a non-finite value as null
                scalars = {event.step: event.value for event in events.Scalars(tag)}
                assert scalars[line["step"]] == pytest.approx(np.nan if value is None else value, nan_ok=True)
    assert [event.step for event in events.Scalars("train/loss")] == [10, 300]
    assert all(event.wall_time > 1.6e9 for event in events.Scalars("train/loss"))
    (image,) = events.Images("val/contours")
    assert (image.step, image.width, image.height) == (10, 8, 6)
    decoded = cv2.imdecode(np.frombuffer(image.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    assert (decoded == [0, 0, 255]).all()  # OpenCV's BGR
    (text,) = events.Tensors("config/text_summary")
    assert text.tensor_proto.string_val == [b"lr: 0.001"]


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = MetricWriter(tmp_path, enabled=False)
    writer.write(1, {"train/loss": 1.0})
    writer.image("val/contours", np.zeros((2, 2, 3), np.uint8), 1)
    writer.text("config", "x")
    writer.plot()
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_every_tag_written_is_read_back_at_its_step(tmp_path):
    """Each write's tags, checked against what was written (not against the JSON file): every tag at every step it
    was logged, in metrics.jsonl and in the events, zeros and non-finite values included, and no tag anywhere else."""
    writes = [
        (1, {"train/loss": 0.9, "train/lr": 0.0, "train/grad_norm": 2.5, "train/images_per_s": 12.0}),
        (2, {"train/loss": 0.7, "train/lr": 5e-4, "train/grad_norm": 0.0, "train/images_per_s": 13.0}),
        (2, {"val/dice": 0.0, "val/auc": float("nan"), "val/n_images": 4, "epoch": 0}),
        (4, {"train/loss": 0.5, "train/lr": 1e-3, "train/grad_norm": 1.5, "train/images_per_s": 0.0}),
        (4, {"val/dice": 0.25, "val/auc": 1.0, "val/n_images": 4, "epoch": 1}),
    ]
    with MetricWriter(tmp_path, enabled=True) as writer:
        for step, scalars in writes:
            writer.write(step, scalars)
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert lines == [{"step": step, **{tag: None if np.isnan(value) else value for tag, value in scalars.items()}}
                     for step, scalars in writes]
    events = read_events(tmp_path / TENSORBOARD_DIR)
    written = {tag for _, scalars in writes for tag in scalars}
    assert set(events.Tags()["scalars"]) == written
    for tag in written:
        expected = {step: scalars[tag] for step, scalars in writes if tag in scalars}
        logged = {event.step: event.value for event in events.Scalars(tag)}
        assert logged.keys() == expected.keys(), tag
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, nan_ok=True), (tag, step)
