"""The wire protocol (see PROTOCOL.md): enum-framed typed messages, JSON only.

Requests and replies (ROUTER socket)::

    request: [b"MPNP/1", <MessageType>, <JSON body with "id">]
    reply:   [b"MPNP/1", b"ok" | b"error", <JSON body with "id">]

Events (PUB socket): ``[<EventType topic>, <JSON body>]``.

Sensor frames (PULL socket): ``[<JSON header>, <buffer>, ...]``; the header names the sensor,
frame id, timestamp and, per buffer, its name, dtype and shape. Buffers are received without a
copy and viewed with ``numpy.frombuffer``. Nothing from the wire is ever unpickled.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from daemon.config import LimitsConfig
from scenes.sensors import SENSORS, SensorSpec

PROTOCOL_VERSION = 1
PROTOCOL_TAG = b"MPNP/1"


class MessageType(str, Enum):
    QUERY = "query"
    STATUS = "status"
    SET_POWER_MODE = "set_power_mode"
    SET_MODALITY = "set_modality"
    ADAPT = "adapt"
    LIST_STORE = "list_store"
    PING = "ping"
    COMPOSE = "compose"
    TEACH = "teach"
    OBJECTS = "objects"
    PSEUDO_LABEL = "pseudo_label"


class ReplyStatus(str, Enum):
    OK = "ok"
    ERROR = "error"


class ErrorCode(str, Enum):
    BAD_FRAMING = "bad_framing"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_COMMAND = "unknown_command"
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    NO_FRAME = "no_frame"
    FRAME_NOT_FOUND = "frame_not_found"
    BACKEND_ERROR = "backend_error"
    STORE_ERROR = "store_error"
    POWER_ERROR = "power_error"
    CONFLICT = "conflict"
    BUSY = "busy"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class EventType(str, Enum):
    MODALITY_SWITCHED = "modality.switched"
    CONTEXT_CHANGED = "context.changed"
    ADAPTATION_STARTED = "adaptation.started"
    ADAPTATION_PROGRESS = "adaptation.progress"
    ADAPTATION_RESULT = "adaptation.result"
    POWER_MODE = "power.mode"
    BUDGET_PLAN = "budget.plan"
    LIFECYCLE = "daemon.lifecycle"
    COMPOSE_STARTED = "compose.started"
    COMPOSE_FINISHED = "compose.finished"


class SensorKind(str, Enum):
    """Names of the first two sensors, kept for callers' convenience. The set is open:
    the wire accepts every sensor registered in :mod:`scenes.sensors` (``SENSORS``), and a
    decoded message names its sensor as a plain string."""

    CAMERA = "camera"
    LIDAR = "lidar"


class DropReason(str, Enum):
    """Why an ingest message was dropped (a Prometheus label)."""

    HEADER_TOO_LARGE = "header_too_large"
    BAD_HEADER = "bad_header"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_SENSOR = "unknown_sensor"
    BUFFER_MISMATCH = "buffer_mismatch"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    NON_FINITE = "non_finite"
    UNSUPPORTED_FRAME = "unsupported_frame"
    STALE = "stale"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A request that cannot be served; becomes an error reply."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class IngestError(Exception):
    """A sensor message that is dropped (and counted under ``reason``)."""

    def __init__(self, reason: DropReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False, default=str).encode()


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN/inf; a
    diverged training loss must not make ``status`` unanswerable)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


# --- bounded JSON -----------------------------------------------------------------------------

#: Nesting deeper than this is refused before parsing (the stdlib parser recurses: ~1,000
#: levels raise ``RecursionError``, which is not a ``ValueError``).
MAX_JSON_DEPTH = 32
#: Longest number literal accepted (an int of thousands of digits costs quadratic time to
#: convert and, over ``sys.get_int_max_str_digits()``, raises).
MAX_NUMBER_CHARS = 64

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class JSONLimitError(ValueError):
    """JSON over a structural limit (depth, number length): refused, never parsed."""


def json_depth(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting of ``raw`` outside strings (linear, no recursion).

    Brackets in an unterminated string count, so malformed input can only look deeper."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _bounded_number(kind: type) -> Any:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise JSONLimitError(f"a number literal of {len(text)} chars (limit "
                                 f"{MAX_NUMBER_CHARS})")
        return kind(text)

    return parse


_PARSE_INT = _bounded_number(int)
_PARSE_FLOAT = _bounded_number(float)


def loads_bounded(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for untrusted bytes: depth and number length bounded first.

    Raises:
        ValueError: not UTF-8/JSON, or over a limit (:class:`JSONLimitError`). Nothing
            else escapes (``RecursionError`` cannot happen under the depth bound).
    """
    raw = bytes(raw)
    depth = json_depth(raw)
    if depth > max_depth:
        raise JSONLimitError(f"JSON nested {depth} deep (limit {max_depth})")
    try:
        return json.loads(raw, parse_int=_PARSE_INT, parse_float=_PARSE_FLOAT)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None
    except RecursionError:  # defensive: the depth check should make this unreachable
        raise JSONLimitError("JSON nested too deep") from None


# --- requests and replies -------------------------------------------------------------------

@dataclass(frozen=True)
class WireRequest:
    type: MessageType
    id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class WireReply:
    status: ReplyStatus
    id: str | None
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status is ReplyStatus.OK


def encode_request(kind: MessageType, request_id: str, body: dict[str, Any]) -> list[bytes]:
    return [PROTOCOL_TAG, kind.value.encode(), _dumps({**body, "id": request_id})]


def decode_request(frames: list[bytes], max_bytes: int) -> WireRequest:
    """Parse a request; raise :class:`ProtocolError` (with the id when it could be read)."""
    if len(frames) != 3:
        raise ProtocolError(ErrorCode.BAD_FRAMING, f"expected 3 frames, got {len(frames)}")
    tag, kind, payload = frames
    if tag != PROTOCOL_TAG:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol tag {bytes(tag)[:16]!r} not supported; this daemon speaks {PROTOCOL_TAG!r}",
        )
    if len(payload) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"request body over {max_bytes} bytes")
    try:
        body = loads_bounded(payload)
    except JSONLimitError as exc:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"body refused: {exc}") from None
    except ValueError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "body must be a JSON object")
    request_id = body.pop("id", None)
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "body.id must be a string of 1..128 chars")
    try:
        message_type = MessageType(bytes(kind).decode("ascii", "replace"))
    except ValueError:
        known = [m.value for m in MessageType]
        raise ProtocolError(
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown message type {bytes(kind)[:32]!r}; known: {known}",
            request_id,
        ) from None
    return WireRequest(message_type, request_id, body)


def encode_reply(reply: WireReply) -> list[bytes]:
    body = {**reply.body, "id": reply.id}
    try:
        payload = _dumps(body)
    except ValueError:  # a NaN/inf somewhere: send null there rather than no reply
        payload = _dumps(finite_json(body))
    return [PROTOCOL_TAG, reply.status.value.encode(), payload]


def error_reply(code: ErrorCode, message: str, request_id: str | None) -> WireReply:
    return WireReply(ReplyStatus.ERROR, request_id, {"code": code.value, "message": message})


def decode_reply(frames: list[bytes]) -> WireReply:
    if len(frames) != 3 or frames[0] != PROTOCOL_TAG:
        raise ProtocolError(ErrorCode.BAD_FRAMING, f"malformed reply ({len(frames)} frames)")
    body = json.loads(frames[2])
    return WireReply(ReplyStatus(bytes(frames[1]).decode()), body.pop("id", None), body)


def encode_event(kind: EventType, body: dict[str, Any]) -> list[bytes]:
    return [kind.value.encode(), _dumps({**body, "event": kind.value, "time": time.time()})]


def decode_event(frames: list[bytes]) -> tuple[EventType, dict[str, Any]]:
    return EventType(bytes(frames[0]).decode()), json.loads(frames[1])


# --- sensor frames --------------------------------------------------------------------------

@dataclass
class SensorMessage:
    """One decoded sensor message (arrays may view zmq-owned memory: read-only).

    ``sensor`` is the registered sensor's name (:mod:`scenes.sensors`)."""

    sensor: str
    frame_id: str
    timestamp: float
    arrays: dict[str, np.ndarray]
    ambient_light: float | None = None
    received_at: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def _sensor_name(sensor: str | SensorKind) -> str:
    return sensor.value if isinstance(sensor, SensorKind) else str(sensor)


def encode_sensor_message(
    sensor: str | SensorKind,
    frame_id: str,
    timestamp: float,
    arrays: dict[str, np.ndarray],
    ambient_light: float | None = None,
) -> list[bytes | memoryview]:
    """Header + one buffer per array (the buffers are the arrays' memory, not copies)."""
    buffers = []
    specs = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        specs.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape)})
        # (a sensor may have nothing to say: a radar without returns sends an empty buffer)
        buffers.append(memoryview(array).cast("B") if array.size else b"")
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION, "sensor": _sensor_name(sensor), "frame_id": frame_id,
        "timestamp": timestamp, "buffers": specs,
    }
    if ambient_light is not None:
        header["ambient_light"] = ambient_light
    return [_dumps(header), *buffers]


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise IngestError(DropReason.BAD_HEADER, f"header.{name} missing or of the wrong type")
    return value


def _as_float(value: int | float, name: str) -> float:
    """A header number as a float; an integer too large for one is non-finite, not a crash."""
    try:
        return float(value)
    except OverflowError:
        raise IngestError(DropReason.NON_FINITE,
                          f"header.{name} does not fit a float") from None


def dtype_names(dtype: np.dtype) -> frozenset[str]:
    """The dtype strings the wire accepts for ``dtype``: a whitelist, so that no wire string
    reaches ``numpy.dtype`` (which parses structured/sub-array specs such as ``"(-1,)f4"``).
    Multi-byte types in the machine's byte order only (the buffers are viewed, not swapped)."""
    dtype = np.dtype(dtype)
    code = f"{dtype.kind}{dtype.itemsize}"
    names = {code, f"={code}", dtype.name, dtype.char}
    if dtype.itemsize == 1:
        names |= {f"|{code}", f"<{code}", f">{code}"}
    else:
        names.add(("<" if np.little_endian else ">") + code)
    return frozenset(names)


def _registered_sensor(value: Any) -> SensorSpec:
    if not isinstance(value, str) or value not in SENSORS:
        raise IngestError(DropReason.UNKNOWN_SENSOR,
                          f"unknown sensor {str(value)[:40]!r}; known: {SENSORS.names()}")
    return SENSORS.get(value)


def decode_sensor_message(frames: list[Any], limits: LimitsConfig) -> SensorMessage:
    """Validate and view one ingest message (``frames`` are zmq Frames or bytes) against the
    registered descriptor of its sensor (:mod:`scenes.sensors`)."""
    if not frames:
        raise IngestError(DropReason.BAD_HEADER, "empty message")
    raw_header = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    if len(raw_header) > limits.max_header_bytes:
        raise IngestError(DropReason.HEADER_TOO_LARGE,
                          f"header of {len(raw_header)} bytes > {limits.max_header_bytes}")
    try:
        header = loads_bounded(raw_header)
    except ValueError as exc:
        raise IngestError(DropReason.BAD_HEADER, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise IngestError(DropReason.BAD_HEADER, "header must be a JSON object")
    version = header.get("v")
    # Exactly the integer 1: ``True == 1`` and ``1.0 == 1`` in Python, not on the wire.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise IngestError(DropReason.UNSUPPORTED_VERSION,
                          f"header.v={str(version)[:20]!r}; this daemon reads the integer "
                          f"{PROTOCOL_VERSION}")
    sensor = _registered_sensor(header.get("sensor"))
    frame_id = _field(header, "frame_id", str)
    if not 0 < len(frame_id) <= 128:
        raise IngestError(DropReason.BAD_HEADER, "header.frame_id must have 1..128 chars")
    timestamp = _as_float(_field(header, "timestamp", (int, float)), "timestamp")
    ambient = header.get("ambient_light")
    if ambient is not None:
        if not isinstance(ambient, (int, float)) or isinstance(ambient, bool):
            raise IngestError(DropReason.BAD_HEADER, "header.ambient_light must be a number")
        ambient = _as_float(ambient, "ambient_light")
    if not math.isfinite(timestamp) or (ambient is not None and not math.isfinite(ambient)):
        raise IngestError(DropReason.NON_FINITE, "header timestamp/ambient_light not finite")
    specs = _field(header, "buffers", list)
    expected = sensor.buffer_names
    if len(specs) != len(expected) or len(frames) - 1 != len(specs):
        raise IngestError(
            DropReason.BUFFER_MISMATCH,
            f"{sensor.name} needs {len(expected)} buffers {list(expected)}; header lists "
            f"{len(specs)}, message carries {len(frames) - 1}",
        )
    arrays: dict[str, np.ndarray] = {}
    total = 0
    for spec, frame in zip(specs, frames[1:]):
        name, array = _view_buffer(sensor, spec, frame, limits)
        total += array.nbytes
        if total > limits.max_frame_bytes:
            raise IngestError(DropReason.TOO_LARGE, f"buffers exceed {limits.max_frame_bytes} B")
        arrays[name] = array
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise IngestError(DropReason.BUFFER_MISMATCH, f"missing buffers {missing}")
    if sensor.same_shape:
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1:
            raise IngestError(DropReason.BAD_SHAPE,
                              f"{sensor.name} buffers differ in shape: {shapes}")
    if sensor.finite:
        for name, array in arrays.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise IngestError(DropReason.NON_FINITE,
                                  f"{sensor.name} {name} holds NaN or inf")
    return SensorMessage(sensor.name, frame_id, timestamp, arrays, ambient)


def _view_buffer(
    sensor: SensorSpec, spec: Any, frame: Any, limits: LimitsConfig
) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict):
        raise IngestError(DropReason.BAD_HEADER, "each header.buffers entry must be an object")
    name = spec.get("name")
    buffer_spec = sensor.buffer(name) if isinstance(name, str) else None
    if buffer_spec is None:
        raise IngestError(DropReason.BUFFER_MISMATCH, f"unexpected buffer {str(name)[:40]!r}")
    dtype = buffer_spec.np_dtype
    accepted = dtype_names(dtype)
    dtype_name = spec.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in accepted:
        message = (f"{name}: dtype {str(dtype_name)[:32]!r}, {sensor.name} needs {dtype} "
                   f"(one of {sorted(accepted)})")
        raise IngestError(DropReason.BAD_DTYPE, message)
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise IngestError(DropReason.BAD_SHAPE, f"{name}: shape must be a list of ints >= 0")
    problem = buffer_spec.shape_problem(shape, limits)
    if problem:
        raise IngestError(DropReason.BAD_SHAPE, f"{sensor.name} {problem}")
    buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(buffer) != expected:
        reason = DropReason.TRUNCATED if len(buffer) < expected else DropReason.BUFFER_MISMATCH
        raise IngestError(reason, f"{name}: {len(buffer)} bytes, shape {shape} needs {expected}")
    if expected > limits.max_frame_bytes:
        raise IngestError(DropReason.TOO_LARGE, f"{name}: {expected} B > {limits.max_frame_bytes}")
    return name, np.frombuffer(buffer, dtype=dtype).reshape(shape)
