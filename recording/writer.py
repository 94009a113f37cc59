"""Writing recordings: rotating, size-bounded MCAP files behind a bounded queue.

:class:`Recorder` is what the daemon's hooks and ``mpnp record`` call. Its methods only put
an item on a bounded queue (never wait: over the bound the item is dropped and counted), and
one writer thread turns items into MCAP messages (:mod:`recording.format`) in
:class:`RotatingMcapWriter`.

Crash safety: MCAP chunks are written whole; the writer finishes the open chunk every
``flush_interval_s``, so a killed recorder leaves files that read up to the last finished
chunk (at most ``flush_interval_s`` of messages, or one ``chunk_bytes`` chunk, are lost;
the file has no summary section, which the reader does not need). A file is closed (summary
and footer written) when it reaches ``max_bytes`` and the next one begins; beyond
``max_files`` files the oldest is deleted.
"""

from __future__ import annotations

import io
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recording import format as fmt

log = logging.getLogger(__name__)

FILE_PATTERN = re.compile(r"^recording-(\d{4,})\.mcap$")


@dataclass
class RecordingSettings:
    """Where and how much to record (the daemon's ``[recording]`` section).

    Attributes:
        path: directory of the files ``recording-0001.mcap``, ``recording-0002.mcap``, ...
            (numbering continues after files already there).
        max_bytes: a file is closed and the next begun once it reaches this size (it may
            exceed it by up to one chunk).
        max_files: at most this many files are kept, the oldest deleted (0: keep all).
        chunk_bytes: MCAP chunk size (zstd-compressed chunks).
        flush_interval_s: the open chunk is written at least this often (what a crash
            can lose).
        queue_bytes / queue_items: the bound of what waits for the writer thread; over it
            messages are dropped and counted (``/mpnp/recorder``, :attr:`Recorder.dropped`).
        status_interval_s: how often the daemon's status is sampled into ``/mpnp/status``.
    """

    path: str = ""
    max_bytes: int = 512 * 2**20
    max_files: int = 8
    chunk_bytes: int = 2**20
    flush_interval_s: float = 1.0
    queue_bytes: int = 64 * 2**20
    queue_items: int = 4096
    status_interval_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "chunk_bytes", "queue_bytes", "queue_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"recording.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_files, bool) or not isinstance(self.max_files, int) \
                or self.max_files < 0:
            raise ValueError(f"recording.max_files must be an integer >= 0, got "
                             f"{self.max_files!r}")
        for name in ("flush_interval_s", "status_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"recording.{name} must be > 0, got {value!r}")
        if self.chunk_bytes > self.max_bytes:
            raise ValueError(f"recording.chunk_bytes ({self.chunk_bytes}) must not exceed "
                             f"recording.max_bytes ({self.max_bytes})")


def recording_files(directory: Path) -> list[Path]:
    """The recording files in ``directory``, oldest first."""
    found = []
    for path in directory.iterdir() if directory.is_dir() else []:
        match = FILE_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


class RotatingMcapWriter:
    """MCAP files in one directory, each a complete recording on its own (every file
    registers its own schemas and channels), closed at ``max_bytes``."""

    def __init__(self, settings: RecordingSettings, library: str = "mpnp") -> None:
        self.settings = settings
        self.library = library
        self.directory = Path(settings.path).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = recording_files(self.directory)
        self._next_index = (int(FILE_PATTERN.match(existing[-1].name).group(1)) + 1
                            if existing else 1)
        self._stream: io.BufferedWriter | None = None
        self._writer: Any = None
        self._schemas: dict[str | None, int] = {}
        self._channels: dict[str, int] = {}
        self.path: Path | None = None
        self.files_written: list[Path] = []
        self.bytes_closed = 0  # bytes of the files already closed in this session

    def _open(self) -> None:
        from mcap.writer import CompressionType, Writer

        self.path = self.directory / f"recording-{self._next_index:04d}.mcap"
        self._next_index += 1
        self._stream = open(self.path, "wb")  # noqa: SIM115 (closed in _close)
        self._writer = Writer(self._stream, chunk_size=self.settings.chunk_bytes,
                              compression=CompressionType.ZSTD)
        self._writer.start(profile=fmt.PROFILE, library=self.library)
        from daemon.protocol import PROTOCOL_VERSION

        self._writer.add_metadata(fmt.METADATA_NAME, {
            "format": "mpnp-recording", "version": fmt.FORMAT_VERSION,
            "protocol": str(PROTOCOL_VERSION), "file": self.path.name,
            "started": f"{time.time():.6f}"})
        self._schemas, self._channels = {}, {}
        self.files_written.append(self.path)
        self._prune()
        log.info("recording to %s", self.path)

    def _prune(self) -> None:
        limit = self.settings.max_files
        if not limit:
            return
        files = recording_files(self.directory)
        for old in files[:max(0, len(files) - limit)]:
            if old != self.path:
                log.info("recording: deleting %s (max_files %d)", old, limit)
                old.unlink(missing_ok=True)

    def _channel(self, topic: str, schema: str | None) -> int:
        channel = self._channels.get(topic)
        if channel is not None:
            return channel
        if schema not in self._schemas:
            if schema is None:
                self._schemas[schema] = 0
            elif schema == "json":
                self._schemas[schema] = self._writer.register_schema(
                    name="mpnp.json", encoding="jsonschema", data=fmt.JSON_SCHEMA)
            else:
                self._schemas[schema] = self._writer.register_schema(
                    name=schema, encoding="protobuf", data=fmt.protobuf_schema(schema))
        encoding = {None: fmt.RAW_BUFFER_ENCODING, "json": "json"}.get(schema, "protobuf")
        channel = self._writer.register_channel(topic=topic, message_encoding=encoding,
                                                schema_id=self._schemas[schema])
        self._channels[topic] = channel
        return channel

    def write(self, topic: str, schema: str | None, data: bytes, log_time_ns: int,
              sequence: int = 0, publish_time_ns: int | None = None) -> None:
        """One message (``schema``: ``"json"``, a Foxglove name, or ``None`` for raw)."""
        if self._writer is None:
            self._open()
        channel = self._channel(topic, schema)
        self._writer.add_message(channel_id=channel, log_time=log_time_ns, data=data,
                                 publish_time=publish_time_ns or log_time_ns,
                                 sequence=sequence & 0xFFFFFFFF)

    def rotate_if_full(self) -> None:
        """Close the current file once it reached ``max_bytes`` (between whole messages:
        a sensor message and its buffers never straddle two files)."""
        if self._stream is not None and self._stream.tell() >= self.settings.max_bytes:
            self._close()

    def flush(self) -> None:
        """Write the open chunk (the crash-safety point)."""
        if self._writer is not None:
            self._writer.flush()

    @property
    def bytes_written(self) -> int:
        current = self._stream.tell() if self._stream is not None else 0
        return self.bytes_closed + current

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.finish()
        assert self._stream is not None
        self.bytes_closed += self._stream.tell()
        self._stream.close()
        self._writer = self._stream = None

    def close(self) -> None:
        self._close()


@dataclass
class _Item:
    kind: str
    log_time_ns: int
    payload: Any
    nbytes: int


class Recorder:
    """Records from any thread without waiting: a bounded queue and one writer thread.

    Call :meth:`sensor` with an accepted ingest message's frames (zmq Frames or bytes; held,
    not copied, until written), :meth:`request` with a request and its reply,
    :meth:`event` and :meth:`status`; :meth:`close` writes what is queued and closes the
    file. Messages over the queue's bound are dropped and counted (:attr:`dropped`).
    """

    def __init__(self, settings: RecordingSettings, library: str = "mpnp") -> None:
        try:  # fail at start, not in the writer thread, when the extra is not installed
            import foxglove_schemas_protobuf  # noqa: F401
            import mcap  # noqa: F401
        except ModuleNotFoundError as exc:
            raise RuntimeError(f"recording needs {exc.name}: pip install \"mpnp[record]\"") \
                from None
        self.settings = settings
        self.files = RotatingMcapWriter(settings, library)
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=settings.queue_items)
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self.dropped: dict[str, int] = {}
        self.written = 0
        self.errors = 0
        self.sensor_bytes = 0  # wire bytes of the sensor messages queued
        self._sequence = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mpnp-recorder", daemon=True)
        self._thread.start()

    # --- producers (any thread, never blocking) --------------------------------------------

    def _put(self, kind: str, payload: Any, nbytes: int) -> bool:
        with self._lock:
            if self._closed:
                return False
            if self._queued_bytes + nbytes > self.settings.queue_bytes:
                self.dropped[kind] = self.dropped.get(kind, 0) + 1
                return False
            try:
                self._queue.put_nowait(_Item(kind, time.time_ns(), payload, nbytes))
            except queue.Full:
                self.dropped[kind] = self.dropped.get(kind, 0) + 1
                return False
            self._queued_bytes += nbytes
        return True

    def sensor(self, frames: list[Any]) -> bool:
        """An ingest message the daemon accepted: header + buffers (as received)."""
        size = sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames)
        accepted = self._put("sensor", frames, size)
        if accepted:
            self.sensor_bytes += size
        return accepted

    def request(self, kind: str, request: dict[str, Any], status: str, reply: dict[str, Any],
                latency_s: float | None = None) -> bool:
        return self._put("request", {"type": kind, "request": request, "status": status,
                                     "reply": reply, "latency_s": latency_s}, 1024)

    def event(self, topic: str, body: dict[str, Any]) -> bool:
        return self._put("event", (topic, body), 1024)

    def status(self, body: dict[str, Any]) -> bool:
        return self._put("status", body, 8192)

    # --- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        next_flush = time.monotonic() + self.settings.flush_interval_s
        while True:
            timeout = max(0.0, next_flush - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = _Item("tick", 0, None, 0)
            if item is None:
                break
            if item.kind != "tick":
                with self._lock:
                    self._queued_bytes -= item.nbytes
                try:
                    self._write(item)
                    self.written += 1
                except Exception:  # one bad item must not stop the recording
                    self.errors += 1
                    log.exception("recording: could not write a %s message", item.kind)
            if time.monotonic() >= next_flush:
                self._flush_safely()
                next_flush = time.monotonic() + self.settings.flush_interval_s
        try:
            self._write_counters()
            self.files.close()
        except Exception:
            log.exception("recording: could not close %s", self.files.path)

    def _flush_safely(self) -> None:
        try:
            self.files.flush()
        except Exception:
            self.errors += 1
            log.exception("recording: flush failed")

    def _write_counters(self) -> None:
        if self.files.path is None and not self.written:
            return
        self.files.write(fmt.TOPIC_RECORDER, "json", fmt.json_bytes(self.counters()),
                         time.time_ns())

    def counters(self) -> dict[str, Any]:
        return {"written": self.written, "dropped": dict(self.dropped), "errors": self.errors,
                "sensor_bytes": self.sensor_bytes,
                "files": [p.name for p in self.files.files_written]}

    def _write(self, item: _Item) -> None:
        t = item.log_time_ns
        if item.kind == "sensor":
            self._write_sensor(item.payload, t)
        elif item.kind == "request":
            self.files.write(fmt.TOPIC_REQUESTS, "json", fmt.json_bytes(item.payload), t)
        elif item.kind == "event":
            topic, body = item.payload  # as on the wire: the body names its event
            self.files.write(fmt.EVENT_PREFIX + topic, "json",
                             fmt.json_bytes({**body, "event": topic}), t)
        elif item.kind == "status":
            self.files.write(fmt.TOPIC_STATUS, "json", fmt.json_bytes(item.payload), t)
        self.files.rotate_if_full()

    def _write_sensor(self, frames: list[Any], t: int) -> None:
        import json

        raw_header = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
        header = json.loads(raw_header)  # validated by the daemon before it was queued
        self._sequence += 1
        sequence = self._sequence
        self.files.write(fmt.TOPIC_INGEST, "json", raw_header, t, sequence)
        sensor = str(header["sensor"])
        timestamp = float(header["timestamp"])
        for spec, frame in zip(header["buffers"], frames[1:]):
            data = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
            stored = fmt.encode_buffer(sensor, spec, data, timestamp)
            self.files.write(stored.topic, stored.schema, stored.data, t, sequence)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, close the file (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("recording: the writer thread did not finish within %.0fs", timeout_s)
