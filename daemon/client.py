"""Python client library for the daemon (requests, events, sensor frames).

Every call has a timeout; sockets use ``LINGER=0``. Requests go over a DEALER socket with a
request id, so a late reply to a timed-out request is recognized and skipped.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from daemon.protocol import (
    EventType,
    MessageType,
    decode_event,
    decode_reply,
    encode_request,
    encode_sensor_message,
)
from daemon.security import load_public_key, secure_client
from scenes.sample import Frame


class DaemonError(RuntimeError):
    """The daemon answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonTimeout(TimeoutError):
    """No reply in time (daemon down, or refused: e.g. CURVE keys not authorized)."""


class _Curve:
    def __init__(self, server_key: str | Path | None, client_cert: str | Path | None) -> None:
        if (server_key is None) != (client_cert is None):
            raise ValueError("CURVE needs both the server public key and a client certificate")
        self.server_public = load_public_key(server_key) if server_key else None
        self.client_cert = str(client_cert) if client_cert else None

    def apply(self, sock: zmq.Socket) -> None:
        if self.server_public is not None and self.client_cert is not None:
            secure_client(sock, self.server_public, self.client_cert)


class Client:
    """Questions and control commands.

    Args:
        endpoint: the daemon's query endpoint (``tcp://127.0.0.1:5556``).
        timeout_s: per-request timeout.
        server_key / client_cert: CURVE: the server's public key file and this client's
            ``.key_secret`` certificate.
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 5.0,
        server_key: str | Path | None = None,
        client_cert: str | Path | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._sock = self._context.socket(zmq.DEALER)
        self._sock.linger = 0
        # A DEALER with no usable peer (e.g. after a refused CURVE handshake, which stops
        # reconnecting) blocks in send: bound that wait by the timeout too.
        self._sock.sndtimeo = max(1, int(timeout_s * 1000))
        _Curve(server_key, client_cert).apply(self._sock)
        self._sock.connect(endpoint)

    def request(self, kind: MessageType, **body: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raise :class:`DaemonError` on an error."""
        return self.request_raw([b"", *encode_request(kind, uuid.uuid4().hex, body)])

    def request_raw(self, frames: list[bytes], expect_id: str | None = None) -> dict[str, Any]:
        """Send already framed parts (tests send malformed ones) and return the reply body."""
        request_id = expect_id
        if request_id is None and len(frames) == 4 and frames[0] == b"":
            try:
                request_id = json.loads(frames[3]).get("id")
            except (ValueError, AttributeError, RecursionError):  # tests send odd bodies
                request_id = None
        try:
            self._sock.send_multipart(frames)
        except zmq.Again:
            raise DaemonTimeout(f"could not send within {self.timeout_s:g}s (no daemon "
                                "connection)") from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000)):
                raise DaemonTimeout(f"no reply within {self.timeout_s:g}s")
            parts = self._sock.recv_multipart()
            reply = decode_reply(parts[1:] if parts and parts[0] == b"" else parts)
            if request_id is not None and reply.id not in (request_id, None):
                continue  # a late reply to an earlier, timed-out request
            if not reply.ok:
                raise DaemonError(reply.body.get("code", "?"), reply.body.get("message", ""))
            return reply.body

    def ping(self) -> dict[str, Any]:
        return self.request(MessageType.PING)

    def status(self) -> dict[str, Any]:
        return self.request(MessageType.STATUS)

    def ask(self, question: str, frame_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"question": question}
        if frame_id is not None:
            body["frame_id"] = frame_id
        return self.request(MessageType.QUERY, **body)

    def set_power_mode(self, mode: str) -> dict[str, Any]:
        return self.request(MessageType.SET_POWER_MODE, mode=mode)

    def set_modality(self, mode: str, modalities: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"mode": mode}
        if modalities is not None:
            body["modalities"] = list(modalities)
        return self.request(MessageType.SET_MODALITY, **body)

    def adapt(self, action: str, modalities: list[str] | None = None,
              force_commit: bool | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"action": action}
        if modalities is not None:
            body["modalities"] = list(modalities)
        if force_commit is not None:
            body["force_commit"] = force_commit
        return self.request(MessageType.ADAPT, **body)

    def compose(self, modalities: list[str], method: str | None = None,
                finetune: bool | None = None,
                force_commit: bool | None = None) -> dict[str, Any]:
        """Compose stored single-modality states into ``modalities`` (training-free); the
        gate's decision comes as a ``compose.finished`` event (and in ``status``)."""
        body: dict[str, Any] = {"modalities": list(modalities)}
        for name, value in (("method", method), ("finetune", finetune),
                            ("force_commit", force_commit)):
            if value is not None:
                body[name] = value
        return self.request(MessageType.COMPOSE, **body)

    def list_store(self) -> dict[str, Any]:
        return self.request(MessageType.LIST_STORE)

    def teach(self, frame_id: str, question: str, answer: str,
              context: str | None = None) -> dict[str, Any]:
        """Store an operator's question/answer pair about a frame the daemon holds."""
        body: dict[str, Any] = {"frame_id": frame_id, "question": question, "answer": answer}
        if context is not None:
            body["context"] = context
        return self.request(MessageType.TEACH, **body)

    def objects(self, frame_id: str, objects: list[dict[str, Any]],
                questions_per_frame: int | None = None,
                context: str | None = None) -> dict[str, Any]:
        """Send the perception stack's object list for a held frame (schema: PROTOCOL.md,
        Live samples); the daemon stores template questions answered from it."""
        body: dict[str, Any] = {"frame_id": frame_id, "objects": list(objects)}
        for name, value in (("questions_per_frame", questions_per_frame),
                            ("context", context)):
            if value is not None:
                body[name] = value
        return self.request(MessageType.OBJECTS, **body)

    def pseudo_label(self, frame_id: str, questions_per_frame: int | None = None,
                     min_confidence: float | None = None,
                     context: str | None = None) -> dict[str, Any]:
        """Have the serving state answer template questions about a held frame and store
        its answers as ``pseudo`` samples of ``context``."""
        body: dict[str, Any] = {"frame_id": frame_id}
        for name, value in (("questions_per_frame", questions_per_frame),
                            ("min_confidence", min_confidence), ("context", context)):
            if value is not None:
                body[name] = value
        return self.request(MessageType.PSEUDO_LABEL, **body)

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventSubscriber:
    """Receives daemon events (optionally only some types)."""

    def __init__(
        self,
        endpoint: str,
        types: list[EventType] | None = None,
        server_key: str | Path | None = None,
        client_cert: str | Path | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._sock = self._context.socket(zmq.SUB)
        self._sock.linger = 0
        _Curve(server_key, client_cert).apply(self._sock)
        for kind in types or [None]:
            self._sock.setsockopt(zmq.SUBSCRIBE, kind.value.encode() if kind else b"")
        self._sock.connect(endpoint)

    def receive(self, timeout_s: float) -> tuple[EventType, dict[str, Any]] | None:
        if not self._sock.poll(int(timeout_s * 1000)):
            return None
        return decode_event(self._sock.recv_multipart())

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SensorPublisher:
    """Sends sensor messages (PUSH, small HWM, never blocks: a full queue drops the frame)."""

    def __init__(
        self,
        endpoint: str,
        hwm: int = 4,
        server_key: str | Path | None = None,
        client_cert: str | Path | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._sock = self._context.socket(zmq.PUSH)
        self._sock.linger = 0
        self._sock.sndhwm = hwm
        _Curve(server_key, client_cert).apply(self._sock)
        self._sock.connect(endpoint)
        self.sent = 0
        self.dropped = 0

    def send_parts(self, parts: list[Any], timeout_s: float | None = None) -> bool:
        """Send one message; with ``timeout_s`` wait up to that long for room in the queue
        (a replay that must lose nothing) instead of dropping at once."""
        try:
            if timeout_s is None:
                self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            else:
                self._sock.sndtimeo = max(1, int(timeout_s * 1000))
                self._sock.send_multipart(parts, copy=False)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def send_sensor(self, frame: Frame, sensor: str, timestamp: float | None = None,
                    ambient_light: float | None = None) -> bool:
        """Send ``frame``'s payload of ``sensor`` (any registered sensor: its buffers as the
        frame holds them, see :mod:`scenes.sensors`)."""
        arrays = {name: np.ascontiguousarray(array)
                  for name, array in frame.payload(sensor).items()}
        return self.send_parts(encode_sensor_message(
            sensor, frame.frame_id, frame.timestamp if timestamp is None else timestamp,
            arrays, ambient_light,
        ))

    def send_camera(self, frame: Frame, timestamp: float | None = None,
                    ambient_light: float | None = None) -> bool:
        return self.send_sensor(frame, "camera", timestamp, ambient_light)

    def send_lidar(self, frame: Frame, timestamp: float | None = None) -> bool:
        return self.send_sensor(frame, "lidar", timestamp)

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> SensorPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
