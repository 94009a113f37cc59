"""One question-answer dataset type over any frame source (synthetic world or nuScenes-QA).

Questions are held in memory; frames are loaded lazily through a loader function and kept
in a small LRU cache, since several questions share a frame and frames are large.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scenes.sample import NIGHT_BELOW, Frame, QAItem
from scenes.storage import (
    QUESTIONS,
    DatasetFormatError,
    load_frame,
    qa_from_json,
    read_json,
    read_manifest,
)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FrameInfo:
    """What is known about a frame without loading it."""

    scene_id: str
    light: float
    #: sha256 of the frame's file when the source records one (generated worlds).
    content: str | None = None

    @property
    def night(self) -> bool:
        return self.light < NIGHT_BELOW


class QADataset:
    """Questions about frames, with frames loaded on demand.

    Attributes:
        items: the questions.
        name: where the data came from (for messages).
    """

    def __init__(self, items: list[QAItem], frames: dict[str, FrameInfo],
                 loader: Callable[[str], Frame], name: str = "", cache_size: int = 16):
        unknown = sorted({q.frame_id for q in items} - set(frames))
        if unknown:
            raise ValueError(f"{name}: questions refer to unknown frames {unknown[:5]}")
        self.items = list(items)
        self.name = name
        self._frames = dict(frames)
        self._loader = loader
        self._cache: OrderedDict[str, Frame] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def load(cls, root: str | Path, split: str, **nuscenes_options) -> QADataset:
        """Load ``split`` of a generated world (``root/manifest.json``) or of nuScenes-QA.

        A directory without a manifest is read as nuScenes-QA: see
        :func:`scenes.nuscenes_qa.load_nuscenes_qa` for ``nuscenes_options``.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset directory {root} does not exist")
        if not (root / "manifest.json").exists():
            from scenes.nuscenes_qa import load_nuscenes_qa

            return load_nuscenes_qa(root, split, **nuscenes_options)
        manifest = read_manifest(root)
        if split not in manifest.get("splits", {}):
            raise DatasetFormatError(f"{root / 'manifest.json'}: no split {split!r}")
        files = manifest.get("files", {})
        qpath = root / split / QUESTIONS
        rel_q = f"{split}/{QUESTIONS}"
        from scenes.storage import sha256_of

        if qpath.is_file() and rel_q in files and sha256_of(qpath) != files[rel_q]:
            raise DatasetFormatError(f"{qpath} is corrupt: its sha256 does not match the manifest")
        payload = read_json(qpath, "questions file")
        try:
            frame_rows = payload["frames"]
            frames = {r["frame_id"]: FrameInfo(r["scene_id"], float(r["light"]),
                                               r.get("sha256"))
                      for r in frame_rows}
            paths = {r["frame_id"]: (root / r["file"], r.get("sha256")) for r in frame_rows}
            items = [qa_from_json(q, str(qpath)) for q in payload["questions"]]
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DatasetFormatError):
                raise
            raise DatasetFormatError(f"{qpath}: malformed questions file ({exc!r})") from exc

        def loader(frame_id: str) -> Frame:
            path, digest = paths[frame_id]
            return load_frame(path, digest)

        return cls(items, frames, loader, name=f"{root}:{split}")

    @property
    def frame_ids(self) -> list[str]:
        """Frames in first-question order (frames without questions last)."""
        seen = dict.fromkeys(q.frame_id for q in self.items)
        seen.update(dict.fromkeys(self._frames))
        return list(seen)

    def frame_info(self, frame_id: str) -> FrameInfo:
        if frame_id not in self._frames:
            raise KeyError(f"{self.name}: no frame {frame_id!r}")
        return self._frames[frame_id]

    def cache_key(self, frame_id: str) -> str:
        """What feature caches key this frame on: its id plus its file's digest where the
        source records one. Generated worlds reuse frame ids (every world has a
        ``day-0000-000``), so the id alone would read another world's tokens; nuScenes
        sample tokens are unique by themselves."""
        info = self.frame_info(frame_id)
        return f"{frame_id}.{info.content[:16]}" if info.content else frame_id

    def frame(self, frame_id: str) -> Frame:
        """The frame (loaded from disk on first use, then cached)."""
        if frame_id in self._cache:
            self._cache.move_to_end(frame_id)
            return self._cache[frame_id]
        self.frame_info(frame_id)  # raises for unknown ids
        frame = self._loader(frame_id)
        self._cache[frame_id] = frame
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return frame

    def filter(self, night: bool | None = None) -> QADataset:
        """Only night (``True``) or day (``False``) frames; ``None`` keeps everything."""
        if night is None:
            keep = dict(self._frames)
        else:
            keep = {k: v for k, v in self._frames.items() if v.night == night}
        items = [q for q in self.items if q.frame_id in keep]
        label = {None: "", True: ":night", False: ":day"}[night]
        return QADataset(items, keep, self._loader, self.name + label, self._cache_size)

    def with_items(self, items: list[QAItem]) -> QADataset:
        """These ``items`` (questions of this dataset) with only the frames they ask about."""
        keep = {q.frame_id for q in items}
        return QADataset(items, {k: v for k, v in self._frames.items() if k in keep},
                         self._loader, self.name, self._cache_size)

    def scene_ids(self) -> set[str]:
        return {info.scene_id for info in self._frames.values()}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> QAItem:
        return self.items[index]

    def __iter__(self) -> Iterator[QAItem]:
        return iter(self.items)

    def __repr__(self) -> str:
        return f"QADataset({self.name!r}, {len(self.items)} questions, {len(self._frames)} frames)"
