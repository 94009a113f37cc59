"""Sensor messages -> frames the model can answer about.

Cameras (≈12 Hz) and LiDAR (≈20 Hz) arrive as separate messages. :class:`FrameBuffer` keeps
the last few of each (bounded) and assembles a :class:`~scenes.sample.Frame` on demand: the
requested frame id (either sensor's) or the latest, paired with the other sensor's message
nearest in time. A modality that is not used gets an empty placeholder.

The ingest thread adds messages while the engine assembles frames, so every method holds
one lock (adding is O(1); assembling scans at most ``history`` messages per sensor).
"""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np

from daemon.protocol import ErrorCode, ProtocolError, SensorKind, SensorMessage
from scenes.sample import CAMERA_VIEWS, LIDAR, Frame

_MODALITY_SENSOR = {"camera": SensorKind.CAMERA, "lidar": SensorKind.LIDAR}


class FrameBuffer:
    def __init__(self, history: int = 32) -> None:
        self._lock = threading.RLock()
        self._messages: dict[SensorKind, deque[SensorMessage]] = {
            kind: deque(maxlen=history) for kind in SensorKind
        }

    def add(self, message: SensorMessage) -> None:
        with self._lock:
            self._messages[message.sensor].append(message)

    def latest(self, sensor: SensorKind) -> SensorMessage | None:
        with self._lock:
            messages = self._messages[sensor]
            return messages[-1] if messages else None

    def _find(self, frame_id: str) -> SensorMessage | None:
        for messages in self._messages.values():
            for message in reversed(messages):
                if message.frame_id == frame_id:
                    return message
        return None

    def _nearest(self, sensor: SensorKind, anchor: SensorMessage) -> SensorMessage | None:
        messages = self._messages[sensor]
        same = [m for m in messages if m.frame_id == anchor.frame_id]
        if same:
            return same[-1]
        if not messages:
            return None
        return min(messages, key=lambda m: abs(m.timestamp - anchor.timestamp))

    def frame(self, modalities: frozenset[str], frame_id: str | None = None) -> Frame:
        """Assemble a frame with every sensor that ``modalities`` need.

        Raises:
            ProtocolError: ``frame_not_found`` for an unknown id (too old or never sent),
                ``no_frame`` when a needed sensor has sent nothing yet.
        """
        with self._lock:
            return self._frame(modalities, frame_id)

    def _frame(self, modalities: frozenset[str], frame_id: str | None) -> Frame:
        needed = [_MODALITY_SENSOR[m] for m in sorted(modalities)]
        if frame_id is not None:
            anchor = self._find(frame_id)
            if anchor is None:
                raise ProtocolError(
                    ErrorCode.FRAME_NOT_FOUND,
                    f"frame {frame_id!r} is not among the last frames held; ask without a "
                    "frame id for the latest",
                )
        else:
            latest = [self.latest(kind) for kind in needed]
            missing = [k.value for k, m in zip(needed, latest) if m is None]
            if missing:
                raise ProtocolError(ErrorCode.NO_FRAME, f"no {missing} frame received yet")
            anchor = max(latest, key=lambda m: m.timestamp)  # type: ignore[arg-type, return-value]
        parts: dict[SensorKind, SensorMessage] = {}
        for kind in needed:
            message = anchor if anchor.sensor is kind else self._nearest(kind, anchor)
            if message is None:
                raise ProtocolError(ErrorCode.NO_FRAME, f"no {kind.value} frame received yet")
            parts[kind] = message
        camera = parts.get(SensorKind.CAMERA)
        lidar = parts.get(SensorKind.LIDAR)
        ambient = next((m.ambient_light for m in parts.values() if m.ambient_light is not None),
                       math.nan)
        if camera is not None:
            cameras = {view: camera.arrays[view] for view in CAMERA_VIEWS}
        else:
            cameras = {view: np.zeros((0, 0, 3), np.uint8) for view in CAMERA_VIEWS}
        points = lidar.arrays[LIDAR] if lidar is not None else np.zeros((0, 4), np.float32)
        return Frame(
            frame_id=anchor.frame_id,
            scene_id="live",
            timestamp=anchor.timestamp,
            light=float(ambient),
            cameras=cameras,
            lidar=points,
        )

    def describe(self) -> dict:
        out = {}
        with self._lock:
            items = [(kind, list(messages)) for kind, messages in self._messages.items()]
        for kind, messages in items:
            last = messages[-1] if messages else None
            out[kind.value] = (
                {"frame_id": last.frame_id, "timestamp": last.timestamp, "held": len(messages)}
                if last else None
            )
        return out
