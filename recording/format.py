"""What a recording holds, channel by channel (PROTOCOL.md, "Recording and replay").

An MCAP file with profile ``mpnp`` and a metadata record ``mpnp.recording``. One sensor
message of the ingest protocol is stored as

- its wire header, verbatim, on ``/mpnp/ingest`` (JSON: the header *is* JSON), and
- one message per buffer, right after it, with the same MCAP ``sequence``:
  ``uint8 (H, W, 3)`` / ``(H, W)`` as ``foxglove.RawImage`` (``rgb8`` / ``mono8``) and
  ``float32 (N, K >= 3)`` as ``foxglove.PointCloud`` (fields x, y, z, intensity, f4, ...) on
  ``/mpnp/<sensor>/<buffer>``, so that Foxglove shows every camera and the LiDAR; any other
  buffer as raw bytes (encoding ``mpnp.buffer``).

The buffer's bytes are the ``data`` field unchanged, so the header and the buffers give back
exactly the multipart message the daemon accepted: replay sends those bytes. Nothing here
knows which sensors exist; the shape and dtype of each buffer decide its channel.

Everything else is JSON (schema encoding ``jsonschema``): ``/mpnp/requests`` (a request and
its reply: questions, answers, latency, control commands), ``/mpnp/event/<topic>`` (every
event the daemon published), ``/mpnp/status`` (a ``status`` reply, sampled: light,
policy, serving set, power mode, adaptation progress, counters) and ``/mpnp/recorder`` (the
recorder's own counters: messages written and dropped).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

PROFILE = "mpnp"
METADATA_NAME = "mpnp.recording"
FORMAT_VERSION = "1"

TOPIC_INGEST = "/mpnp/ingest"
TOPIC_REQUESTS = "/mpnp/requests"
TOPIC_STATUS = "/mpnp/status"
TOPIC_RECORDER = "/mpnp/recorder"
EVENT_PREFIX = "/mpnp/event/"
SENSOR_PREFIX = "/mpnp/"

RAW_IMAGE = "foxglove.RawImage"
POINT_CLOUD = "foxglove.PointCloud"
RAW_BUFFER_ENCODING = "mpnp.buffer"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def buffer_topic(sensor: str, buffer: str) -> str:
    """``/mpnp/<sensor>/<buffer>`` (names from the wire, reduced to safe characters)."""
    return f"{SENSOR_PREFIX}{_UNSAFE.sub('_', sensor)}/{_UNSAFE.sub('_', buffer)}"


def json_bytes(body: Any) -> bytes:
    """Compact JSON; a non-finite float becomes ``null`` (JSON has none)."""
    from daemon.protocol import finite_json

    return json.dumps(finite_json(body), separators=(",", ":"), allow_nan=False,
                      default=str).encode()


@dataclass(frozen=True)
class StoredBuffer:
    """One buffer as written: its channel's schema (``None``: raw) and message bytes."""

    topic: str
    schema: str | None
    data: bytes


_POINT_FIELD_NAMES = ("x", "y", "z", "intensity")


def buffer_kind(dtype: str, shape: list[int]) -> str | None:
    """The Foxglove schema a buffer of this dtype string and shape is shown with."""
    try:
        parsed = np.dtype(dtype)
    except TypeError:
        return None
    if parsed == np.uint8 and (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3)):
        return RAW_IMAGE
    if parsed == np.float32 and parsed.byteorder in "=<|" and len(shape) == 2 and shape[1] >= 3:
        return POINT_CLOUD
    return None


def encode_buffer(sensor: str, spec: dict[str, Any], data: memoryview | bytes,
                  timestamp: float) -> StoredBuffer:
    """The message that stores one buffer of a validated sensor message."""
    from foxglove_schemas_protobuf.PackedElementField_pb2 import PackedElementField
    from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud
    from foxglove_schemas_protobuf.RawImage_pb2 import RawImage
    from google.protobuf.timestamp_pb2 import Timestamp

    name, shape = str(spec["name"]), list(spec["shape"])
    topic = buffer_topic(sensor, name)
    kind = buffer_kind(str(spec["dtype"]), shape)
    seconds, nanos = divmod(int(round(timestamp * 1e9)), 10**9)
    stamp = Timestamp(seconds=seconds, nanos=nanos)
    if kind == RAW_IMAGE:
        height, width = shape[0], shape[1]
        channels = shape[2] if len(shape) == 3 else 1
        message = RawImage(timestamp=stamp, frame_id=name, width=width, height=height,
                           encoding="rgb8" if channels == 3 else "mono8",
                           step=width * channels, data=bytes(data))
        return StoredBuffer(topic, RAW_IMAGE, message.SerializeToString())
    if kind == POINT_CLOUD:
        count = shape[1]
        names = [_POINT_FIELD_NAMES[i] if i < len(_POINT_FIELD_NAMES) else f"f{i}"
                 for i in range(count)]
        fields = [PackedElementField(name=n, offset=4 * i, type=PackedElementField.FLOAT32)
                  for i, n in enumerate(names)]
        message = PointCloud(timestamp=stamp, frame_id=name, point_stride=4 * count,
                             fields=fields, data=bytes(data))
        return StoredBuffer(topic, POINT_CLOUD, message.SerializeToString())
    return StoredBuffer(topic, None, bytes(data))


def decode_buffer(schema: str | None, data: bytes) -> bytes:
    """The buffer's wire bytes back from its stored message."""
    if schema == RAW_IMAGE:
        from foxglove_schemas_protobuf.RawImage_pb2 import RawImage

        return RawImage.FromString(data).data
    if schema == POINT_CLOUD:
        from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud

        return PointCloud.FromString(data).data
    return bytes(data)


def protobuf_schema(name: str) -> bytes:
    """The ``FileDescriptorSet`` of a Foxglove message (MCAP's ``protobuf`` schema data):
    its ``.proto`` file and every file it imports."""
    from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud
    from foxglove_schemas_protobuf.RawImage_pb2 import RawImage
    from google.protobuf.descriptor_pb2 import FileDescriptorProto, FileDescriptorSet

    message = {RAW_IMAGE: RawImage, POINT_CLOUD: PointCloud}[name]
    files = FileDescriptorSet()
    seen: set[str] = set()

    def add(descriptor: Any) -> None:
        if descriptor.name in seen:
            return
        seen.add(descriptor.name)
        for dependency in descriptor.dependencies:
            add(dependency)
        proto = FileDescriptorProto()
        descriptor.CopyToProto(proto)
        files.file.append(proto)

    add(message.DESCRIPTOR.file)
    return files.SerializeToString()


#: The JSON channels' schema: an object (Foxglove reads the fields from the messages).
JSON_SCHEMA = b'{"type": "object"}'
