"""The local store: encoders, aligners and adapted states as safetensors + a JSON manifest.

Layout::

    <root>/manifest.json              {"format": "mpnp-store", "version": 1, "entries": {...}}
    <root>/<kind>s/<name>.<token>.safetensors   one file per entry version, sha256 in the manifest

Crash safety: every file (entries and the manifest) is written to a temp file in the same
directory, fsynced, renamed over the target and the directory fsynced. An entry's file is
committed before the manifest names it, so a crash at any moment leaves either the old or the
new manifest, and every entry it names is complete. On open, leftover temp files and files no
manifest names (an interrupted save) are removed. Adapted states get increasing generation
numbers; :meth:`ModelStore.latest_good_state` returns the newest one whose checksum verifies,
so a restart resumes with the last good state.

Loading is on demand through an LRU cache with a memory budget. A missing or corrupt entry is
a :class:`StoreError` that names it and says how to fix it; callers keep serving.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from mpnp.files import TEMP_PREFIX, atomic_write, atomic_write_bytes, sha256_file

log = logging.getLogger(__name__)

STORE_FORMAT = "mpnp-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_BACKUP = "manifest.json.bak"
QUARANTINE = "quarantine"
STATE_PREFIX = "state-"


class StoreError(RuntimeError):
    """A missing, corrupt or unloadable store entry (the message says which and why)."""


class EntryKind(str, Enum):
    ENCODER = "encoder"
    ALIGNER = "aligner"
    STATE = "state"


@dataclass(frozen=True)
class StoreEntry:
    name: str
    kind: EntryKind
    file: str  # relative to the store root
    sha256: str
    bytes: int
    created: float
    generation: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreEntry:
        return cls(**{**data, "kind": EntryKind(data["kind"])})


def _nbytes(obj: Any, fallback: int) -> int:
    if isinstance(obj, dict) and obj and all(hasattr(v, "nbytes") for v in obj.values()):
        return int(sum(v.nbytes for v in obj.values()))
    return fallback


def load_safetensors_numpy(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


class ModelStore:
    """A directory of checksummed safetensors entries with an LRU-cached loader.

    Args:
        root: the store directory (created).
        memory_budget_bytes: most bytes kept loaded; least recently used entries are evicted.
        keep_states: adapted states to keep (oldest pruned); ``None`` keeps all.
        lock: take an exclusive ``flock`` on the store (one writer process at a time).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        memory_budget_bytes: int = 4 << 30,
        keep_states: int | None = 5,
        lock: bool = True,
    ) -> None:
        if memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
        if keep_states is not None and keep_states < 1:
            raise ValueError(f"keep_states must be >= 1 or None, got {keep_states}")
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.memory_budget_bytes = memory_budget_bytes
        self.keep_states = keep_states
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        if lock:
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                raise StoreError(f"store {self.root} is in use by another process") from None
        self._entries: dict[str, StoreEntry] = {}
        self._next_generation = 1
        self._quarantine = False  # set when the manifest had to be recovered
        self._cache: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._read_manifest()
        self._recover()

    # --- manifest -------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @staticmethod
    def _parse_manifest(path: Path) -> tuple[dict[str, StoreEntry], int]:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT or \
                data.get("version") != STORE_VERSION:
            raise ValueError("not an mpnp-store v1 manifest")
        entries = {n: StoreEntry.from_dict(e) for n, e in data["entries"].items()}
        return entries, int(data.get("next_generation", 1))

    def _read_manifest(self) -> None:
        """Read the manifest; a damaged one (truncated, say) must not keep the daemon from
        starting: it is moved aside and the backup copy (written after every manifest) is
        used, else the store starts empty with its files moved to ``quarantine/``."""
        path = self.manifest_path
        if not path.exists():
            return
        try:
            self._entries, self._next_generation = self._parse_manifest(path)
            return
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            aside = path.with_name(f"{MANIFEST}.corrupt-{int(time.time())}")
            log.error("store manifest %s is unreadable (%s); moved to %s", path, exc, aside.name)
            os.replace(path, aside)
        backup = self.root / MANIFEST_BACKUP
        try:
            self._entries, self._next_generation = self._parse_manifest(backup)
            log.warning("store: recovered %d entries from %s", len(self._entries), backup.name)
            self._quarantine = True  # files only the lost manifest named are kept aside
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            log.error("store: no usable manifest backup (%s); starting empty, existing files "
                      "go to %s/ (re-import them by hand)", exc, QUARANTINE)
            self._entries, self._quarantine = {}, True
            return
        # The next generation must stay above every file on disk (the backup may be older).
        self._write_manifest()

    def _write_manifest(self) -> None:
        data = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "next_generation": self._next_generation,
            "entries": {n: e.to_dict() for n, e in sorted(self._entries.items())},
        }
        raw = json.dumps(data, indent=1).encode()
        atomic_write_bytes(self.manifest_path, raw)
        # The same bytes again, atomically: a manifest damaged later (outside our writes)
        # falls back to this copy at the next open.
        atomic_write_bytes(self.root / MANIFEST_BACKUP, raw)

    def _recover(self) -> None:
        """Remove temp files and files that no manifest entry names (interrupted saves);
        after an unrecoverable manifest, move the unnamed files to ``quarantine/``."""
        named = {e.file for e in self._entries.values()}
        quarantine = self._quarantine
        for path in list(self.root.rglob("*")):
            if not path.is_file() or path.name in (MANIFEST, MANIFEST_BACKUP, ".lock"):
                continue
            rel = path.relative_to(self.root).as_posix()
            if rel.startswith(f"{QUARANTINE}/") or path.name.startswith(f"{MANIFEST}.corrupt-"):
                continue
            if path.name.startswith(TEMP_PREFIX):
                log.warning("store: removing leftover %s from an interrupted write", rel)
                path.unlink(missing_ok=True)
            elif path.suffix == ".safetensors" and rel not in named:
                if quarantine:
                    target = self.root / QUARANTINE / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
                    log.warning("store: moved %s to %s/", rel, QUARANTINE)
                else:
                    log.warning("store: removing leftover %s from an interrupted write", rel)
                    path.unlink(missing_ok=True)

    # --- entries --------------------------------------------------------------------------

    def entries(self, kind: EntryKind | None = None) -> list[StoreEntry]:
        with self._mutex:
            items = list(self._entries.values())
        return [e for e in items if kind is None or e.kind is kind]

    def get(self, name: str) -> StoreEntry:
        with self._mutex:
            entry = self._entries.get(name)
        if entry is None:
            raise StoreError(
                f"store {self.root} has no entry {name!r}; entries: {sorted(self._entries)[:20]}"
            )
        return entry

    def path(self, entry: StoreEntry) -> Path:
        return self.root / entry.file

    def verify(self, name: str) -> StoreEntry:
        """Check that the entry's file exists and matches its sha256 (raise otherwise)."""
        entry = self.get(name)
        path = self.path(entry)
        if not path.is_file():
            raise StoreError(f"store entry {name!r}: file {path} is missing; re-save the entry")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise StoreError(
                f"store entry {name!r}: {path} is corrupt (sha256 {digest[:12]}.. != "
                f"{entry.sha256[:12]}..); delete it and re-save the entry"
            )
        return entry

    def put(
        self,
        name: str,
        kind: EntryKind,
        writer: Callable[[Path], None],
        meta: dict[str, Any] | None = None,
        generation: int = 0,
    ) -> StoreEntry:
        """Write an entry through ``writer(path)`` (atomic) and commit it to the manifest."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"store entry name {name!r} must be a plain file name")
        # A fresh file per version: overwriting an entry never touches the file the current
        # manifest names, so a crash between the file and the manifest cannot corrupt it.
        rel = f"{kind.value}s/{name}.{uuid.uuid4().hex[:12]}.safetensors"
        with self._mutex:
            digest, size = atomic_write(self.root / rel, writer)
            entry = StoreEntry(name, kind, rel, digest, size, time.time(), generation, meta or {})
            previous = self._entries.get(name)
            self._entries[name] = entry
            self._cache.pop(name, None)
            self._write_manifest()
            if previous is not None and previous.file != rel:
                self.path(previous).unlink(missing_ok=True)
        log.info("store: saved %s (%s, %d bytes, sha256 %s..)", name, kind.value, size, digest[:12])
        return entry

    def put_arrays(
        self, name: str, kind: EntryKind, arrays: dict[str, np.ndarray],
        meta: dict[str, Any] | None = None,
    ) -> StoreEntry:
        from safetensors.numpy import save_file

        return self.put(name, kind, lambda p: save_file(arrays, str(p)), meta)

    def remove(self, name: str) -> None:
        with self._mutex:
            entry = self.get(name)
            del self._entries[name]
            self._cache.pop(name, None)
            self._write_manifest()  # forget it first: a crash leaves only an orphan file
            self.path(entry).unlink(missing_ok=True)

    # --- adapted states -------------------------------------------------------------------

    def save_state(
        self, writer: Callable[[Path], None], meta: dict[str, Any] | None = None
    ) -> StoreEntry:
        """Save a new adapted-state generation and prune beyond ``keep_states``."""
        with self._mutex:
            generation = self._next_generation
            self._next_generation += 1
            entry = self.put(f"{STATE_PREFIX}{generation:08d}", EntryKind.STATE, writer, meta,
                             generation)
            if self.keep_states is not None:
                for old in self.states()[self.keep_states:]:
                    self.remove(old.name)
        return entry

    def states(self, modalities: Iterable[str] | None = None) -> list[StoreEntry]:
        """Adapted states, newest first (optionally only those for one modality set)."""
        wanted = sorted(modalities) if modalities is not None else None
        states = [
            e for e in self.entries(EntryKind.STATE)
            if wanted is None or sorted(e.meta.get("modalities", [])) == wanted
        ]
        return sorted(states, key=lambda e: e.generation, reverse=True)

    def latest_good_state(self, modalities: Iterable[str] | None = None) -> StoreEntry | None:
        """The newest state whose file verifies; corrupt ones are logged and skipped."""
        for entry in self.states(modalities):
            try:
                return self.verify(entry.name)
            except StoreError as exc:
                log.error("store: skipping state: %s", exc)
        return None

    # --- on-demand loading ----------------------------------------------------------------

    def load(self, name: str, loader: Callable[[Path], Any] | None = None) -> Any:
        """Load (or return the cached) entry; verifies the checksum on first load."""
        with self._mutex:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name][0]
            entry = self.verify(name)
            path = self.path(entry)
            try:
                obj = (loader or load_safetensors_numpy)(path)
            except Exception as exc:
                raise StoreError(f"store entry {name!r}: cannot load {path}: {exc}") from exc
            size = _nbytes(obj, entry.bytes)
            if size > self.memory_budget_bytes:
                raise StoreError(
                    f"store entry {name!r} needs {size} bytes, over the memory budget of "
                    f"{self.memory_budget_bytes}; raise store.memory_budget_mb"
                )
            while self._cache and self.memory_used + size > self.memory_budget_bytes:
                evicted, _ = self._cache.popitem(last=False)
                log.info("store: evicted %s (LRU, budget %d B)", evicted, self.memory_budget_bytes)
            self._cache[name] = (obj, size)
            return obj

    def evict(self, name: str | None = None) -> None:
        """Drop one loaded entry (or all) from memory; the next load reads it again."""
        with self._mutex:
            if name is None:
                self._cache.clear()
            else:
                self._cache.pop(name, None)

    @property
    def memory_used(self) -> int:
        return sum(size for _, size in self._cache.values())

    def cached(self) -> list[str]:
        return list(self._cache)

    def summary(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "entries": [e.to_dict() for e in sorted(self.entries(), key=lambda e: e.name)],
            "loaded": self.cached(),
            "memory_used": self.memory_used,
            "memory_budget": self.memory_budget_bytes,
        }

    def close(self) -> None:
        with self._mutex:
            self._cache.clear()
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None
