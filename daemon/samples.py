"""Live training samples: what a vehicle collected, kept on disk per data context.

A *sample* is one question/answer pair about one live frame, tagged with where its label came
from (``source``: ``objects`` — generated from the perception stack's object list with the
project's question templates; ``taught`` — an operator's pair; ``pseudo`` — a trusted serving
state's answer) and how sure that source is (``confidence`` in 0..1).

Layout of one context's buffer (``<root>/<context>/``)::

    manifest.json          index of the segments (written with mpnp.files.atomic_write)
    seg-00000001.safetensors
    seg-00000002.safetensors ...

A *segment* is one frame and the samples added with it: its sensor payloads as raw tensors
(``<sensor>/<buffer>``: the buffers exactly as they arrived, so any encoder — today's or a
later one — can encode them) and the sample records as JSON in the safetensors metadata.
Nothing is ever pickled. Each segment is written atomically (temp file, fsync, rename), then
the manifest; segments are self-describing, so the manifest is only an index:

- a segment the manifest names but that is missing, of another size or another sha256
  (truncated or damaged outside our writes) is dropped at open, with a warning;
- a segment the manifest does not name (the process died between the two writes) is
  adopted again when it reads back cleanly, else removed;
- an unreadable manifest is rebuilt from the segments.

So a crash loses at most the segment being written. Bounds: ``max_bytes`` (segment files)
and ``max_samples``; over either, the *oldest segments* (lowest sequence number, i.e. added
first) are evicted whole until both hold. The held-out split is by time
(:meth:`SampleBuffer.split`): the newest frames (by frame timestamp) validate.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpnp.files import TEMP_PREFIX, atomic_write, atomic_write_text, sha256_file
from scenes.sample import Frame, QAItem

log = logging.getLogger(__name__)

SOURCES = ("objects", "taught", "pseudo")
MANIFEST = "manifest.json"
SEGMENT_FORMAT = "mpnp-live-samples"
SEGMENT_VERSION = 1
_SEGMENT = re.compile(r"^seg-(\d{8})\.safetensors$")
_CONTEXT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class LiveSample:
    """One labelled question about one live frame.

    Attributes:
        frame_id: the frame's id as it arrived.
        timestamp: the frame's timestamp (sensor clock): the time split orders by it.
        question / answer: the pair.
        source: ``objects``, ``taught`` or ``pseudo``.
        confidence: how sure the source is (0..1; 1.0 for object lists and operators).
        template_type / num_hop: the template's, where generated (``""`` / 0 otherwise).
        added_at: wall-clock time the daemon stored it.
    """

    frame_id: str
    timestamp: float
    question: str
    answer: str
    source: str
    confidence: float = 1.0
    template_type: str = ""
    num_hop: int = 0
    added_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"sample source must be one of {SOURCES}, got {self.source!r}")
        if not (math.isfinite(self.confidence) and 0.0 <= self.confidence <= 1.0):
            raise ValueError(f"sample confidence must be in 0..1, got {self.confidence!r}")

    @property
    def frame_key(self) -> str:
        """Names the frame uniquely among live frames (ids may repeat after a restart)."""
        return frame_key(self.frame_id, self.timestamp)

    def qa_item(self) -> QAItem:
        """The sample as a training item about frame :attr:`frame_key`."""
        return QAItem(self.frame_key, self.question, self.answer, self.template_type,
                      self.num_hop, meta={"source": self.source,
                                          "confidence": self.confidence})


def frame_key(frame_id: str, timestamp: float) -> str:
    return f"live:{frame_id}@{timestamp!r}"


@dataclass(frozen=True)
class SegmentInfo:
    """One segment as the manifest records it."""

    seq: int
    file: str
    bytes: int
    sha256: str
    samples: int
    frame_id: str
    timestamp: float


@dataclass
class LiveSplit:
    """Train and held-out items of a context's buffer, and the frames they ask about."""

    context: str
    train: list[QAItem]
    val: list[QAItem]
    frames: dict[str, Frame]  # by frame key (QAItem.frame_id)

    def __len__(self) -> int:
        return len(self.train) + len(self.val)


def _tensor_name(sensor: str, buffer: str) -> str:
    return f"{sensor}/{buffer}"


class SampleBuffer:
    """One context's bounded, crash-safe store of live samples (see the module docstring).

    Thread-safe (one lock): the engine adds, an adaptation reads.
    """

    def __init__(self, root: str | Path, max_bytes: int, max_samples: int) -> None:
        if max_bytes < 1 or max_samples < 1:
            raise ValueError("sample buffer bounds must be >= 1")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.evicted = 0  # segments evicted by the bounds since open
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        self._segments: dict[int, SegmentInfo] = {}
        self._open()

    # --- opening and recovery -------------------------------------------------------------

    def _open(self) -> None:
        listed: dict[int, SegmentInfo] = {}
        manifest = self.root / MANIFEST
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            for entry in data["segments"]:
                info = SegmentInfo(**entry)
                listed[info.seq] = info
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("samples %s: unreadable manifest (%s); rebuilding it from the "
                        "segments", self.root, exc)
            listed = {}
        changed = False
        for info in list(listed.values()):
            path = self.root / info.file
            problem = self._problem(path, info)
            if problem:
                log.warning("samples %s: dropping %s: %s", self.root, info.file, problem)
                path.unlink(missing_ok=True)
                del listed[info.seq]
                changed = True
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(TEMP_PREFIX):
                path.unlink(missing_ok=True)  # an interrupted write
                continue
            match = _SEGMENT.match(path.name)
            if match is None or int(match.group(1)) in listed:
                continue
            try:
                info = self._describe(path, int(match.group(1)))
            except Exception as exc:  # safetensors raises its own error type on torn files
                log.warning("samples %s: removing unreadable %s: %s", self.root, path.name, exc)
                path.unlink(missing_ok=True)
                continue
            log.info("samples %s: adopting %s (not in the manifest)", self.root, path.name)
            listed[info.seq] = info
            changed = True
        self._segments = dict(sorted(listed.items()))
        if changed:
            self._write_manifest()
        self._evict()

    @staticmethod
    def _problem(path: Path, info: SegmentInfo) -> str | None:
        if not path.is_file():
            return "missing"
        size = path.stat().st_size
        if size != info.bytes:
            return f"{size} bytes, the manifest says {info.bytes} (torn or truncated)"
        if sha256_file(path) != info.sha256:
            return "sha256 differs from the manifest's"
        return None

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != SEGMENT_FORMAT:
            raise ValueError(f"not a {SEGMENT_FORMAT} segment")
        if int(meta.get("version", -1)) != SEGMENT_VERSION:
            raise ValueError(f"segment version {meta.get('version')} (reads {SEGMENT_VERSION})")
        return meta

    def _describe(self, path: Path, seq: int) -> SegmentInfo:
        """The record of a segment the manifest does not name, after reading it back
        whole (a torn file raises)."""
        from safetensors.numpy import load_file

        meta = self._read_meta(path)
        load_file(str(path))
        samples = json.loads(meta["samples"])
        frame = json.loads(meta["frame"])
        return SegmentInfo(seq, path.name, path.stat().st_size, sha256_file(path),
                           len(samples), frame["frame_id"], float(frame["timestamp"]))

    def _write_manifest(self) -> None:
        body = {"format": SEGMENT_FORMAT, "version": SEGMENT_VERSION,
                "segments": [asdict(s) for s in self._segments.values()]}
        atomic_write_text(self.root / MANIFEST, json.dumps(body, indent=1))

    # --- writing --------------------------------------------------------------------------

    def add(self, frame: Frame, samples: Sequence[LiveSample]) -> SegmentInfo:
        """Store ``samples`` (all about ``frame``) as one new segment, then evict the oldest
        segments over the bounds. Returns the new segment's record."""
        if not samples:
            raise ValueError("no samples to add")
        for sample in samples:
            if sample.frame_id != frame.frame_id:
                raise ValueError(f"sample about {sample.frame_id!r} added with frame "
                                 f"{frame.frame_id!r}")
        tensors: dict[str, np.ndarray] = {}
        layout: dict[str, list[str]] = {}
        for sensor, payload in sorted(frame.sensors.items()):
            layout[sensor] = sorted(payload)
            for buffer, array in payload.items():
                tensors[_tensor_name(sensor, buffer)] = np.ascontiguousarray(array)
        meta = {
            "format": SEGMENT_FORMAT, "version": str(SEGMENT_VERSION),
            "frame": json.dumps({"frame_id": frame.frame_id, "scene_id": frame.scene_id,
                                 "timestamp": frame.timestamp,
                                 "light": frame.light if math.isfinite(frame.light) else None,
                                 "sensors": layout}),
            "samples": json.dumps([asdict(s) for s in samples]),
        }
        from safetensors.numpy import save_file

        with self._lock:
            seq = max(self._segments, default=0) + 1
            name = f"seg-{seq:08d}.safetensors"
            digest, size = atomic_write(self.root / name,
                                        lambda p: save_file(tensors, str(p), metadata=meta))
            info = SegmentInfo(seq, name, size, digest, len(samples), frame.frame_id,
                               float(frame.timestamp))
            self._segments[seq] = info
            self._evict_locked()
            self._write_manifest()
        return info

    def _evict(self) -> None:
        with self._lock:
            before = len(self._segments)
            self._evict_locked()
            if len(self._segments) != before:
                self._write_manifest()

    def _evict_locked(self) -> None:
        # The newest segment always stays, even alone over a bound (it was just accepted).
        while len(self._segments) > 1 and (self._bytes() > self.max_bytes
                                           or self._count() > self.max_samples):
            seq = next(iter(self._segments))
            info = self._segments.pop(seq)
            (self.root / info.file).unlink(missing_ok=True)
            self.evicted += 1
            log.info("samples %s: evicted %s (%d samples of frame %s)", self.root, info.file,
                     info.samples, info.frame_id)

    # --- reading --------------------------------------------------------------------------

    def _bytes(self) -> int:
        return sum(s.bytes for s in self._segments.values())

    def _count(self) -> int:
        return sum(s.samples for s in self._segments.values())

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes()

    def segments(self) -> list[SegmentInfo]:
        with self._lock:
            return list(self._segments.values())

    def read(self, info: SegmentInfo) -> tuple[Frame, list[LiveSample]]:
        """A segment's frame (its stored sensors) and samples."""
        from safetensors.numpy import load_file

        path = self.root / info.file
        meta = self._read_meta(path)
        tensors = load_file(str(path))
        frame_meta = json.loads(meta["frame"])
        sensors = {sensor: {b: tensors[_tensor_name(sensor, b)] for b in buffers}
                   for sensor, buffers in frame_meta["sensors"].items()}
        light = frame_meta["light"]
        frame = Frame(frame_meta["frame_id"], frame_meta["scene_id"],
                      float(frame_meta["timestamp"]),
                      math.nan if light is None else float(light), sensors)
        samples = [LiveSample(**s) for s in json.loads(meta["samples"])]
        return frame, samples

    def items(self) -> Iterator[tuple[Frame, list[LiveSample]]]:
        """Every segment's frame and samples, oldest segment first (a segment evicted or
        dropped meanwhile is skipped)."""
        for info in self.segments():
            try:
                yield self.read(info)
            except Exception as exc:  # damaged since open: skip it, keep the others
                log.warning("samples %s: skipping %s: %s", self.root, info.file, exc)

    def split(self, val_fraction: float) -> tuple[list[LiveSample], list[LiveSample]]:
        """(train, val) samples: the newest ``val_fraction`` of the *frames* (by frame
        timestamp; at least one frame when there are two or more) validate, so that no frame's
        questions are both trained on and validated on. One frame: all train, no val."""
        train, val, _ = self._split(val_fraction, with_frames=False)
        return train, val

    def live_split(self, context: str, val_fraction: float) -> LiveSplit:
        """:meth:`split` as training items with the frames they ask about."""
        train, val, frames = self._split(val_fraction, with_frames=True)
        return LiveSplit(context, [s.qa_item() for s in train], [s.qa_item() for s in val],
                         frames)

    def _split(self, val_fraction: float, with_frames: bool
               ) -> tuple[list[LiveSample], list[LiveSample], dict[str, Frame]]:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        by_frame: dict[str, list[LiveSample]] = {}
        frames: dict[str, Frame] = {}
        if with_frames:
            for frame, samples in self.items():
                for sample in samples:
                    by_frame.setdefault(sample.frame_key, []).append(sample)
                frames.setdefault(frame_key(frame.frame_id, frame.timestamp), frame)
        else:  # the records only: the segments' metadata, not their tensors
            for info in self.segments():
                try:
                    meta = self._read_meta(self.root / info.file)
                    samples = [LiveSample(**r) for r in json.loads(meta["samples"])]
                except Exception as exc:  # damaged since open: skip it, keep the others
                    log.warning("samples %s: skipping %s: %s", self.root, info.file, exc)
                    continue
                for sample in samples:
                    by_frame.setdefault(sample.frame_key, []).append(sample)
        order = sorted(by_frame, key=lambda k: (by_frame[k][0].timestamp, k))
        n_val = 0 if len(order) < 2 else max(1, round(val_fraction * len(order)))
        n_val = min(n_val, len(order) - 1)
        cut = len(order) - n_val
        train = [s for k in order[:cut] for s in by_frame[k]]
        val = [s for k in order[cut:] for s in by_frame[k]]
        return train, val, frames

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"samples": self._count(), "segments": len(self._segments),
                    "bytes": self._bytes(), "max_bytes": self.max_bytes,
                    "max_samples": self.max_samples, "evicted_segments": self.evicted}


class LiveSamples:
    """The sample buffers of every data context, under one root (``<root>/<context>/``)."""

    def __init__(self, root: str | Path, max_bytes: int, max_samples: int,
                 min_samples: int = 32, val_fraction: float = 0.2, mode: str = "world") -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.min_samples = min_samples
        self.val_fraction = val_fraction
        self.mode = mode
        self._buffers: dict[str, SampleBuffer] = {}
        self._lock = threading.Lock()
        if self.root.is_dir():
            for path in sorted(self.root.iterdir()):
                if path.is_dir() and _CONTEXT.match(path.name):
                    self.buffer(path.name)

    def buffer(self, context: str) -> SampleBuffer:
        if not isinstance(context, str) or not _CONTEXT.match(context):
            raise ValueError(f"context {str(context)[:40]!r} must match {_CONTEXT.pattern}")
        with self._lock:
            buffer = self._buffers.get(context)
            if buffer is None:
                buffer = self._buffers[context] = SampleBuffer(self.root / context,
                                                               self.max_bytes, self.max_samples)
            return buffer

    def add(self, context: str, frame: Frame, samples: Sequence[LiveSample]) -> SegmentInfo:
        return self.buffer(context).add(frame, samples)

    def training_split(self, context: str) -> LiveSplit | None:
        """What an adaptation for ``context`` trains and validates on from the buffer, or
        ``None``: ``mode`` is ``world``, or the buffer holds fewer than ``min_samples``, or
        the time split leaves no validation frame."""
        if self.mode == "world":
            return None
        with self._lock:
            buffer = self._buffers.get(context)
        if buffer is None or len(buffer) < self.min_samples:
            log.info("live samples: %d in %r (< %d): adapting on the world's data",
                     0 if buffer is None else len(buffer), context, self.min_samples)
            return None
        split = buffer.live_split(context, self.val_fraction)
        if not split.train or not split.val:
            log.info("live samples of %r: no held-out frame yet; adapting on the world's data",
                     context)
            return None
        return split

    def describe(self) -> dict[str, Any]:
        with self._lock:
            buffers = dict(self._buffers)
        return {"mode": self.mode, "min_samples": self.min_samples,
                "val_fraction": self.val_fraction, "root": str(self.root),
                "contexts": {c: b.describe() for c, b in buffers.items()}}
