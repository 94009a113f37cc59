"""ROS 2 sensor messages -> the ingest protocol's sensor messages, without a ROS installation.

``sensor_msgs/msg/Image``, ``CompressedImage`` and ``PointCloud2`` (deserialized by
``rosbags`` from CDR) become buffers of a protocol sensor message, through a topic map (TOML)::

    [topics."/cam_front/image_raw"]
    sensor = "camera"
    buffer = "CAM_FRONT"

    [topics."/lidar_top/points"]
    sensor = "lidar"
    buffer = "LIDAR_TOP"

Every topic mapped to one sensor is one of its buffers: a protocol message is emitted once
each of them has a message since the last one (six camera topics make one camera message),
stamped with the newest header stamp. Whether the result is a message the daemon accepts
(all the buffers a sensor needs, dtypes, shapes) is the protocol decoder's call, made by the
replay before anything is sent.

Conversions: images ``rgb8``, ``bgr8``, ``rgba8``, ``bgra8``, ``mono8`` (any row padding)
-> ``uint8 (H, W, 3)`` RGB; compressed images (JPEG, PNG: whatever Pillow reads) -> RGB;
point clouds with float/int fields x, y, z (and optionally intensity; else 0) -> ``float32
(N, 4)``, points with a non-finite coordinate (the NaNs of organized clouds) removed.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
POINT_CLOUD2 = "sensor_msgs/msg/PointCloud2"
CONVERTIBLE = (IMAGE, COMPRESSED_IMAGE, POINT_CLOUD2)


class ConvertError(ValueError):
    """One ROS message that cannot become a protocol buffer (the message says why)."""


@dataclass(frozen=True)
class TopicTarget:
    sensor: str
    buffer: str


@dataclass(frozen=True)
class TopicMap:
    """ROS topic -> (protocol sensor, buffer name)."""

    topics: dict[str, TopicTarget]
    source: str = "topic map"

    @classmethod
    def load(cls, path: str | Path) -> TopicMap:
        """Read a TOML topic map; a malformed one is one error naming the file and key."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"topic map {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "topic map") -> TopicMap:
        unknown = sorted(set(data) - {"topics"})
        if unknown:
            raise ValueError(f"{source}: unknown sections {unknown}; a topic map has [topics]")
        topics = data.get("topics")
        if not isinstance(topics, dict) or not topics:
            raise ValueError(f"{source}: needs [topics.\"/ros/topic\"] tables with sensor and "
                             "buffer")
        targets: dict[str, TopicTarget] = {}
        for topic, entry in topics.items():
            if not isinstance(entry, dict) or set(entry) != {"sensor", "buffer"} or not all(
                    isinstance(entry[k], str) and entry[k] for k in ("sensor", "buffer")):
                raise ValueError(f"{source}: topics.{topic!r} must have exactly sensor = "
                                 "\"...\" and buffer = \"...\"")
            targets[topic] = TopicTarget(entry["sensor"], entry["buffer"])
        pairs = [(t.sensor, t.buffer) for t in targets.values()]
        duplicated = sorted({p for p in pairs if pairs.count(p) > 1})
        if duplicated:
            raise ValueError(f"{source}: several topics fill {duplicated[0][0]}/"
                             f"{duplicated[0][1]}")
        return cls(targets, source)

    def buffers(self, sensor: str) -> list[str]:
        return [t.buffer for t in self.topics.values() if t.sensor == sensor]


def _stamp(message: Any, fallback_ns: int) -> float:
    stamp = getattr(getattr(message, "header", None), "stamp", None)
    if stamp is None or (stamp.sec == 0 and stamp.nanosec == 0):
        return fallback_ns / 1e9
    return stamp.sec + stamp.nanosec * 1e-9


_IMAGE_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "8UC3": 3,
                   "8UC1": 1}


def image_array(message: Any, topic: str) -> np.ndarray:
    """``sensor_msgs/msg/Image`` -> ``uint8 (H, W, 3)`` RGB."""
    encoding = str(message.encoding)
    channels = _IMAGE_CHANNELS.get(encoding)
    if channels is None:
        raise ConvertError(f"{topic}: {IMAGE} encoding {encoding!r} cannot be converted to a "
                           f"camera view (convertible: {', '.join(_IMAGE_CHANNELS)})")
    height, width, step = int(message.height), int(message.width), int(message.step)
    data = np.asarray(message.data, dtype=np.uint8).reshape(-1)
    if height <= 0 or width <= 0 or step < width * channels or data.size < height * step:
        raise ConvertError(f"{topic}: {IMAGE} {width}x{height} {encoding} with step {step} "
                           f"holds {data.size} bytes (needs {height * step})")
    rows = data[:height * step].reshape(height, step)[:, :width * channels]
    pixels = rows.reshape(height, width, channels)
    if encoding in ("bgr8", "bgra8"):
        pixels = pixels[..., 2::-1]
    elif channels == 4:
        pixels = pixels[..., :3]
    elif channels == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels)


def compressed_array(message: Any, topic: str) -> np.ndarray:
    """``sensor_msgs/msg/CompressedImage`` (JPEG, PNG, ...) -> ``uint8 (H, W, 3)`` RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(np.asarray(message.data, np.uint8)))) as image:
            return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ConvertError(f"{topic}: {COMPRESSED_IMAGE} format {message.format!r} cannot be "
                           f"decoded: {exc}") from None


_POINT_TYPES = {1: "u1", 2: "i1", 3: "u2", 4: "i2", 5: "u4", 6: "i4", 7: "f4", 8: "f8"}


def point_array(message: Any, topic: str) -> np.ndarray:
    """``sensor_msgs/msg/PointCloud2`` -> ``float32 (N, 4)``: x, y, z, intensity."""
    fields = {f.name: f for f in message.fields}
    missing = [n for n in ("x", "y", "z") if n not in fields]
    if missing:
        raise ConvertError(f"{topic}: {POINT_CLOUD2} has no field(s) {missing} (fields: "
                           f"{sorted(fields)})")
    order = ">" if message.is_bigendian else "<"
    names, formats, offsets = [], [], []
    for name in ("x", "y", "z", "intensity"):
        f = fields.get(name)
        if f is None:
            continue
        kind = _POINT_TYPES.get(int(f.datatype))
        if kind is None:
            raise ConvertError(f"{topic}: {POINT_CLOUD2} field {name} has datatype "
                               f"{f.datatype}, which cannot be converted")
        names.append(name)
        formats.append(order + kind)
        offsets.append(int(f.offset))
    point_step, width, height = int(message.point_step), int(message.width), int(message.height)
    row_step = int(message.row_step)
    try:
        dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets,
                          "itemsize": point_step})
    except ValueError as exc:
        raise ConvertError(f"{topic}: {POINT_CLOUD2} field layout is invalid: {exc}") from None
    data = np.asarray(message.data, dtype=np.uint8).reshape(-1)
    if width * point_step > row_step or data.size < height * row_step:
        raise ConvertError(f"{topic}: {POINT_CLOUD2} {width}x{height} points of {point_step} "
                           f"B (row {row_step} B) holds {data.size} bytes")
    rows = data[:height * row_step].reshape(height, row_step)[:, :width * point_step]
    points = np.ascontiguousarray(rows).reshape(-1).view(dtype)
    out = np.zeros((points.shape[0], 4), np.float32)
    for i, name in enumerate(("x", "y", "z", "intensity")):
        if name in names:
            out[:, i] = points[name]
    return out[np.isfinite(out).all(axis=1)]


_CONVERTERS = {IMAGE: image_array, COMPRESSED_IMAGE: compressed_array,
               POINT_CLOUD2: point_array}


class Ros2Converter:
    """Turns a stream of mapped ROS messages into protocol sensor messages (wire parts)."""

    def __init__(self, topic_map: TopicMap) -> None:
        self.map = topic_map
        self._pending: dict[str, dict[str, tuple[np.ndarray, float]]] = {}

    def add(self, topic: str, msgtype: str, message: Any, log_time_ns: int
            ) -> list[bytes | memoryview] | None:
        """The wire parts of a sensor message once ``topic``'s sensor has all its buffers;
        ``None`` until then. Raises :class:`ConvertError` for a message that cannot be
        converted."""
        from daemon.protocol import encode_sensor_message
        from scenes.sensors import SENSORS

        target = self.map.topics[topic]
        converter = _CONVERTERS.get(msgtype)
        if converter is None:
            raise ConvertError(f"{topic}: {msgtype} cannot be converted (convertible: "
                               f"{', '.join(CONVERTIBLE)})")
        array = converter(message, topic)
        pending = self._pending.setdefault(target.sensor, {})
        pending[target.buffer] = (array, _stamp(message, log_time_ns))
        wanted = self.map.buffers(target.sensor)
        if any(name not in pending for name in wanted):
            return None
        timestamp = max(stamp for _, stamp in pending.values())
        arrays = {name: pending[name][0] for name in wanted}
        self._pending[target.sensor] = {}
        if target.sensor not in SENSORS.names():
            raise ConvertError(f"{topic}: sensor {target.sensor!r} (from {self.map.source}) is "
                               f"not a registered sensor ({', '.join(SENSORS.names())})")
        frame_id = f"ros-{int(round(timestamp * 1e9))}"
        return encode_sensor_message(target.sensor, frame_id, timestamp, arrays)
