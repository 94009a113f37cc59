"""Reading recordings: ours (a file or a directory of rotated files), ROS 2 MCAP files and
rosbag2 directories (sqlite3 or MCAP storage), as one stream of :class:`Item`.

What cannot be read is one line each, never a traceback: a path that is neither
(:class:`RecordingError`), a file cut short (a notice: the messages before the cut are
used), an unknown topic (a notice, skipped), a ROS message that cannot be converted (a
notice per topic and reason, skipped, counted in :attr:`RecordingReader.skipped`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recording import format as fmt
from recording.ros2 import CONVERTIBLE, ConvertError, Ros2Converter, TopicMap
from recording.writer import recording_files

log = logging.getLogger(__name__)

MCAP_MAGIC = b"\x89MCAP0\r\n"


class RecordingError(ValueError):
    """A path that cannot be replayed or reported (one line, naming it and why)."""


@dataclass
class Item:
    """One recorded thing, in recording order.

    ``kind``: ``sensor`` (``parts``: the wire message), ``request`` (a request and its
    reply), ``event``, ``status`` or ``recorder`` (``body``: the JSON object).
    """

    kind: str
    log_time_ns: int
    topic: str
    parts: list[Any] | None = None
    body: dict[str, Any] | None = None


@dataclass
class RecordingReader:
    """Iterate a recording: ``for item in RecordingReader(path, topic_map): ...``.

    ``notice`` receives each one-line problem (truncation, unknown topics, unconvertible
    messages); ``skipped`` counts what was not turned into an item, by reason.
    """

    path: Path
    topic_map: TopicMap | None = None
    notice: Callable[[str], None] = log.warning
    skipped: dict[str, int] = field(default_factory=dict)
    kind: str = ""  # "mpnp", "ros2-mcap" or "rosbag2", set by :meth:`open`
    _noted: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._sources = self._classify()

    def _note(self, key: str, line: str) -> None:
        self.skipped[key] = self.skipped.get(key, 0) + 1
        if key not in self._noted:
            self._noted.add(key)
            self.notice(line)

    # --- what the path is ---------------------------------------------------------------

    def _classify(self) -> list[Path]:
        path = self.path
        if not path.exists():
            raise RecordingError(f"{path}: no such file or directory")
        if path.is_dir():
            if (path / "metadata.yaml").is_file():
                self.kind = "rosbag2"
                return [path]
            files = recording_files(path)
            if not files:
                raise RecordingError(f"{path}: not a recording (no recording-NNNN.mcap files "
                                     "and no rosbag2 metadata.yaml in it)")
            self.kind = "mpnp"
            return files
        if path.name == "metadata.yaml":
            self.kind = "rosbag2"
            return [path.parent]
        with open(path, "rb") as fh:
            head = fh.read(len(MCAP_MAGIC))
        if head != MCAP_MAGIC:
            if (path.parent / "metadata.yaml").is_file():
                self.kind = "rosbag2"
                return [path.parent]
            raise RecordingError(f"{path}: not an MCAP file or a rosbag2 directory (starts "
                                 f"with {head!r})")
        self.kind = self._mcap_kind(path)
        return [path]

    def _mcap_kind(self, path: Path) -> str:
        from mcap.records import Channel, Header
        from mcap.stream_reader import StreamReader

        with open(path, "rb") as fh:
            records = StreamReader(fh).records
            profile = ""
            topics: dict[str, str] = {}
            try:
                for record in records:
                    if isinstance(record, Header):
                        profile = record.profile
                        if profile == fmt.PROFILE:
                            return "mpnp"
                    elif isinstance(record, Channel):
                        topics[record.topic] = record.message_encoding
                        if record.message_encoding == "cdr":
                            return "ros2-mcap"
                        if len(topics) > 64:
                            break
            except Exception as exc:  # cut before any channel: say so below
                log.debug("%s: stopped classifying: %s", path, exc)
        if profile == "ros2":
            return "ros2-mcap"
        listed = ", ".join(f"{t} ({e})" for t, e in list(topics.items())[:8]) or "none"
        raise RecordingError(f"{path}: an MCAP file that is neither an mpnp recording "
                             f"(profile {fmt.PROFILE!r}) nor ROS 2 (cdr messages): profile "
                             f"{profile!r}, channels {listed}")

    # --- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Item]:
        if self.kind == "mpnp":
            if self.topic_map is not None:
                self.notice(f"{self.path}: an mpnp recording; the topic map is not used")
            for path in self._sources:
                yield from self._read_mpnp(path)
            return
        if self.topic_map is None:
            topics = ", ".join(f"{t} ({m})" for t, m in sorted(self._ros_topics().items()))
            raise RecordingError(f"{self.path}: a ROS 2 recording needs a topic map "
                                 f"(--map topics.toml); its topics: {topics or 'none'}")
        self._check_map(self._ros_topics())
        converter = Ros2Converter(self.topic_map)
        messages = (self._read_rosbag2() if self.kind == "rosbag2"
                    else self._read_ros2_mcap(self._sources[0]))
        for topic, msgtype, message, log_time in messages:
            try:
                parts = converter.add(topic, msgtype, message, log_time)
            except ConvertError as exc:
                self._note(f"unconvertible {topic}: {str(exc)[:60]}", f"skipped: {exc}")
                continue
            if parts is not None:
                yield Item("sensor", log_time, topic, parts=parts)

    def _read_mpnp(self, path: Path) -> Iterator[Item]:
        from mcap.records import Channel, Message, Metadata, Schema

        schemas: dict[int, str] = {}
        channels: dict[int, tuple[str, str | None]] = {}
        # a sensor message waiting for its buffers: (item, MCAP sequence, buffer specs)
        pending: tuple[Item, int, list[dict[str, Any]]] | None = None
        stream = _McapStream(path)
        for record in stream:
            if isinstance(record, Metadata) and record.name == fmt.METADATA_NAME:
                version = record.metadata.get("version")
                if version != fmt.FORMAT_VERSION:
                    self._note("format version", f"{path}: recording format version "
                               f"{version!r}; this version reads {fmt.FORMAT_VERSION!r} "
                               "(unknown channels are skipped)")
            elif isinstance(record, Schema):
                schemas[record.id] = record.name
            elif isinstance(record, Channel):
                schema = schemas.get(record.schema_id) if record.schema_id else None
                channels[record.id] = (record.topic, schema)
            elif isinstance(record, Message):
                topic, schema = channels.get(record.channel_id, ("?", None))
                if pending is not None and topic != fmt.TOPIC_INGEST \
                        and topic.startswith(fmt.SENSOR_PREFIX) \
                        and record.sequence == pending[1]:
                    item, _, specs = pending
                    assert item.parts is not None
                    item.parts.append(fmt.decode_buffer(schema, record.data))
                    if len(item.parts) == len(specs) + 1:
                        pending = None
                        yield item
                    continue
                if pending is not None:
                    self._note("incomplete sensor message", f"{path}: a sensor message "
                               f"without all its buffers (sequence {pending[1]}); skipped")
                    pending = None
                item = self._mpnp_item(topic, record, path)
                if item is None:
                    continue
                if item.kind == "sensor":
                    specs = (item.body or {}).get("buffers") or []
                    item.body = None
                    if not specs:
                        yield item
                    else:
                        pending = (item, record.sequence, specs)
                    continue
                yield item
        if stream.failure is not None:
            lost = " (and one sensor message cut in the middle)" if pending else ""
            self._note(f"truncated {path}", f"{path}: truncated or damaged after "
                       f"{stream.messages} messages{lost} ({stream.failure}); the "
                       "messages before the cut are used")
            return
        if pending is not None:
            self._note(f"truncated {path}", f"{path}: ends inside a sensor message "
                       f"(sequence {pending[1]}); skipped")

    def _mpnp_item(self, topic: str, record: Any, path: Path) -> Item | None:
        t = record.log_time
        if topic == fmt.TOPIC_INGEST:
            try:
                header = json.loads(record.data)
                specs = header["buffers"]
            except (ValueError, KeyError, TypeError):
                self._note("bad ingest header", f"{path}: an /mpnp/ingest header that is not "
                           "a sensor header; skipped")
                return None
            return Item("sensor", t, topic, parts=[bytes(record.data)],
                        body={"buffers": specs if isinstance(specs, list) else []})
        kinds = {fmt.TOPIC_REQUESTS: "request", fmt.TOPIC_STATUS: "status",
                 fmt.TOPIC_RECORDER: "recorder"}
        kind = kinds.get(topic) or ("event" if topic.startswith(fmt.EVENT_PREFIX) else None)
        if kind is None:
            self._note(f"unknown topic {topic}", f"{path}: unknown topic {topic} (not written "
                       "by this version's recorder); skipped")
            return None
        try:
            body = json.loads(record.data)
        except ValueError:
            self._note(f"bad json {topic}", f"{path}: {topic}: a message that is not JSON; "
                       "skipped")
            return None
        return Item(kind, t, topic, body=body if isinstance(body, dict) else {"value": body})

    # --- ROS 2 --------------------------------------------------------------------------

    def _ros_topics(self) -> dict[str, str]:
        """topic -> message type of the ROS 2 source."""
        if self.kind == "rosbag2":
            from rosbags.rosbag2 import Reader

            try:
                with Reader(self._sources[0]) as reader:
                    return {c.topic: c.msgtype for c in reader.connections}
            except Exception as exc:
                raise RecordingError(f"{self._sources[0]}: not a readable rosbag2 "
                                     f"({type(exc).__name__}: {exc})") from None
        from mcap.records import Channel, Schema
        from mcap.stream_reader import StreamReader

        topics: dict[str, str] = {}
        schemas: dict[int, str] = {}
        with open(self._sources[0], "rb") as fh:
            try:
                for record in StreamReader(fh).records:
                    if isinstance(record, Schema):
                        schemas[record.id] = record.name
                    elif isinstance(record, Channel):
                        topics[record.topic] = schemas.get(record.schema_id, "?")
            except Exception as exc:  # truncated: the iteration says so with the messages
                log.debug("listing topics stopped: %s", exc)
        return topics

    def _check_map(self, topics: dict[str, str]) -> None:
        assert self.topic_map is not None
        for topic in self.topic_map.topics:
            if topic not in topics:
                listed = ", ".join(f"{t} ({m})" for t, m in sorted(topics.items()))
                raise RecordingError(f"topic {topic} (from {self.topic_map.source}) is not in "
                                     f"{self.path}; its topics: {listed or 'none'}")
            if topics[topic] not in CONVERTIBLE:
                raise RecordingError(f"{self.path}: topic {topic} is {topics[topic]}, which "
                                     f"cannot be converted (convertible: "
                                     f"{', '.join(CONVERTIBLE)})")
        unmapped = sorted(set(topics) - set(self.topic_map.topics))
        if unmapped:
            self.notice(f"{self.path}: not in the topic map, ignored: {', '.join(unmapped)}")

    def _typestore(self) -> Any:
        from rosbags.typesys import Stores, get_typestore

        return get_typestore(Stores.ROS2_HUMBLE)

    def _read_rosbag2(self) -> Iterator[tuple[str, str, Any, int]]:
        from rosbags.rosbag2 import Reader

        assert self.topic_map is not None
        typestore = self._typestore()
        with Reader(self._sources[0]) as reader:
            wanted = [c for c in reader.connections if c.topic in self.topic_map.topics]
            count = 0
            iterator = reader.messages(connections=wanted)
            while True:
                try:
                    connection, timestamp, raw = next(iterator)
                except StopIteration:
                    return
                except Exception as exc:
                    self._note(f"truncated {self.path}", f"{self.path}: truncated or damaged "
                               f"after {count} messages ({type(exc).__name__}: {exc}); the "
                               "messages before are used")
                    return
                count += 1
                message = self._deserialize(typestore, raw, connection.msgtype,
                                            connection.topic)
                if message is not None:
                    yield connection.topic, connection.msgtype, message, timestamp

    def _read_ros2_mcap(self, path: Path) -> Iterator[tuple[str, str, Any, int]]:
        from mcap.records import Channel, Message, Schema

        assert self.topic_map is not None
        typestore = self._typestore()
        schemas: dict[int, str] = {}
        channels: dict[int, tuple[str, str]] = {}
        stream = _McapStream(path)
        for record in stream:
            if isinstance(record, Schema):
                schemas[record.id] = record.name
            elif isinstance(record, Channel):
                channels[record.id] = (record.topic, schemas.get(record.schema_id, "?"))
            elif isinstance(record, Message):
                topic, msgtype = channels.get(record.channel_id, ("?", "?"))
                if topic not in self.topic_map.topics:
                    continue
                message = self._deserialize(typestore, record.data, msgtype, topic)
                if message is not None:
                    yield topic, msgtype, message, record.log_time
        if stream.failure is not None:
            self._note(f"truncated {path}", f"{path}: truncated or damaged after "
                       f"{stream.messages} messages ({stream.failure}); the "
                       "messages before the cut are used")

    def _deserialize(self, typestore: Any, raw: bytes, msgtype: str, topic: str) -> Any:
        try:
            return typestore.deserialize_cdr(raw, msgtype)
        except Exception as exc:
            self._note(f"undecodable {topic}", f"skipped: {topic}: a {msgtype} message that "
                       f"cannot be deserialized ({type(exc).__name__}: {exc})")
            return None


class _McapStream:
    """The records of one MCAP file, read to its end or to a truncated or damaged tail.

    Iterating stops quietly at a bad tail; :attr:`failure` then says what went wrong and
    :attr:`messages` how many message records came before it, for the caller's one note.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages = 0
        self.failure: str | None = None

    def __iter__(self) -> Iterator[Any]:
        from mcap.records import Message
        from mcap.stream_reader import StreamReader

        with open(self.path, "rb") as fh:
            records = StreamReader(fh).records
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    return
                except Exception as exc:
                    self.failure = f"{type(exc).__name__}: {str(exc)[:80] or 'end of file'}"
                    return
                if isinstance(record, Message):
                    self.messages += 1
                yield record
