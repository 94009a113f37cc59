"""Sensor messages -> frames the model can answer about.

Each sensor (cameras ≈12 Hz, LiDAR ≈20 Hz, radars ≈13 Hz, any registered one) sends separate
messages. :class:`FrameBuffer` keeps the last few of each sensor (bounded) and assembles a
:class:`~scenes.sample.Frame` on demand: the requested frame id (any sensor's) or the latest,
paired with each other needed sensor's message nearest in time. A modality is a sensor's
name (:mod:`scenes.sensors`); the frame carries the sensors the modalities need.

The ingest thread adds messages while the engine assembles frames, so every method holds
one lock (adding is O(1); assembling scans at most ``history`` messages per sensor).
"""

from __future__ import annotations

import math
import threading
from collections import deque

from daemon.protocol import ErrorCode, ProtocolError, SensorMessage
from scenes.sample import Frame
from scenes.sensors import SENSORS


class FrameBuffer:
    def __init__(self, history: int = 32) -> None:
        self._lock = threading.RLock()
        self._history = history
        # one deque per registered sensor; a sensor registered later gets its own on first use
        self._messages: dict[str, deque[SensorMessage]] = {
            name: deque(maxlen=history) for name in SENSORS.names()
        }

    def _queue(self, sensor: str) -> deque[SensorMessage]:
        queue = self._messages.get(sensor)
        if queue is None:
            queue = self._messages[sensor] = deque(maxlen=self._history)
        return queue

    def add(self, message: SensorMessage) -> None:
        with self._lock:
            self._queue(message.sensor).append(message)

    def latest(self, sensor: str) -> SensorMessage | None:
        with self._lock:
            messages = self._messages.get(sensor)
            return messages[-1] if messages else None

    def _find(self, frame_id: str) -> SensorMessage | None:
        for messages in self._messages.values():
            for message in reversed(messages):
                if message.frame_id == frame_id:
                    return message
        return None

    def _nearest(self, sensor: str, anchor: SensorMessage) -> SensorMessage | None:
        messages = self._messages.get(sensor) or ()
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
        needed = sorted(modalities)
        unknown = [m for m in needed if m not in SENSORS]
        if unknown:  # a modality no sensor provides (a diagnostic one): nothing to pair
            raise ProtocolError(ErrorCode.NO_FRAME, f"no sensor provides {unknown}; known "
                                f"sensors: {SENSORS.names()}")
        if frame_id is not None:
            anchor = self._find(frame_id)
            if anchor is None:
                raise ProtocolError(
                    ErrorCode.FRAME_NOT_FOUND,
                    f"frame {frame_id!r} is not among the last frames held; ask without a "
                    "frame id for the latest",
                )
        else:
            latest = [self.latest(sensor) for sensor in needed]
            missing = [k for k, m in zip(needed, latest) if m is None]
            if missing:
                raise ProtocolError(ErrorCode.NO_FRAME, f"no {missing} frame received yet")
            anchor = max(latest, key=lambda m: m.timestamp)  # type: ignore[arg-type, return-value]
        parts: dict[str, SensorMessage] = {}
        for sensor in needed:
            message = anchor if anchor.sensor == sensor else self._nearest(sensor, anchor)
            if message is None:
                raise ProtocolError(ErrorCode.NO_FRAME, f"no {sensor} frame received yet")
            parts[sensor] = message
        ambient = next((m.ambient_light for m in parts.values() if m.ambient_light is not None),
                       math.nan)
        sensors = {sensor: {name: message.arrays[name]
                            for name in SENSORS.get(sensor).buffer_names}
                   for sensor, message in parts.items()}
        return Frame(
            frame_id=anchor.frame_id,
            scene_id="live",
            timestamp=anchor.timestamp,
            light=float(ambient),
            sensors=sensors,
        )

    def sensors_held(self) -> frozenset[str]:
        """The sensors that have a message in the buffer (what a stored frame can carry)."""
        with self._lock:
            return frozenset(sensor for sensor, messages in self._messages.items() if messages)

    def describe(self) -> dict:
        out = {}
        with self._lock:
            items = [(sensor, list(messages)) for sensor, messages in self._messages.items()]
        for sensor, messages in items:
            last = messages[-1] if messages else None
            out[sensor] = (
                {"frame_id": last.frame_id, "timestamp": last.timestamp, "held": len(messages)}
                if last else None
            )
        return out
