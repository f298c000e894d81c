"""The metric writer: JSON lines, TensorBoard event files read back with protobuf itself, and the curves PNG."""

from __future__ import annotations

import json
import struct

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from siim_jax.logging_utils import CURVES_FILE, METRICS_FILE, MetricWriter, crc32c


def event_message_class():
    """tensorflow.Event / Summary, declared here from their .proto field numbers (TensorFlow is not installed)."""
    proto = descriptor_pb2.FileDescriptorProto(name="event_for_test.proto", package="tftest", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto
    value = proto.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary = proto.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, type_name=".tftest.Value", label=F.LABEL_REPEATED)
    event = proto.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, type_name=".tftest.Summary", label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tftest.Event"))


def masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path) -> list[bytes]:
    data, records, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        (length_crc,) = struct.unpack_from("<I", data, offset + 8)
        assert length_crc == masked(crc32c(data[offset : offset + 8]))
        payload = data[offset + 12 : offset + 12 + length]
        (payload_crc,) = struct.unpack_from("<I", data, offset + 12 + length)
        assert payload_crc == masked(crc32c(payload))
        records.append(payload)
        offset += 16 + length
    return records


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value


def test_writer_outputs(tmp_path):
    writer = MetricWriter(tmp_path, enabled=True)
    writer.write(10, {"train/loss": 0.5, "train/lr": 1e-3})
    writer.write(10, {"val/dice": 0.75, "val/auc": float("nan"), "epoch": 1})
    writer.write(300, {"train/loss": 0.25, "train/lr": 5e-4})
    writer.plot()
    writer.close()

    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert lines[1] == {"step": 10, "val/dice": 0.75, "val/auc": None, "epoch": 1.0}
    assert (tmp_path / CURVES_FILE).read_bytes().startswith(b"\x89PNG")

    (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    Event = event_message_class()
    events = [Event.FromString(record) for record in read_records(event_file)]
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert scalars[:2] == [(10, "train/loss", 0.5), (10, "train/lr", pytest.approx(1e-3))]
    assert (300, "train/loss", 0.25) in scalars
    assert all(e.wall_time > 1.6e9 for e in events)


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = MetricWriter(tmp_path, enabled=False)
    writer.write(1, {"train/loss": 1.0})
    writer.plot()
    writer.close()
    assert list(tmp_path.iterdir()) == []
