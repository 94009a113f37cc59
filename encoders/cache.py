"""A disk cache of encoder outputs per frame, keyed by the encoder's fingerprint and the frame.

Frozen encoders give the same tokens for the same frame every time, so aligner training and
benchmarks encode each frame once. Layout::

    DIR/<fingerprint>/<frame key>.safetensors     {"tokens": (T, D) float32}

Because the fingerprint hashes kind, config and every weight, a changed encoder reads from
another folder and simply misses. The frame key names the frame's *content*, not just its
id: frame ids repeat across generated worlds, so :func:`encode_frames` keys on
``key_of(frame_id)`` (a dataset's :meth:`~scenes.dataset.QADataset.cache_key`: id + file
digest) or, without it, on the id plus the loaded frame's
:meth:`~scenes.sample.Frame.content_digest`. Writes go to a temporary file that is renamed
into place, so a crash never leaves a half-written entry; an unreadable entry counts as a miss.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from encoders.base import Encoder
from mpnp.files import atomic_write
from scenes.sample import Frame

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{16,64}$")


class FeatureCache:
    """Encoder outputs per (encoder fingerprint, frame key) under ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, fingerprint: str, frame_key: str) -> Path:
        if not _FINGERPRINT.match(fingerprint):
            raise ValueError(f"not an encoder fingerprint: {fingerprint!r}")
        if not _SAFE_ID.match(frame_key) or ".." in frame_key:
            raise ValueError(f"frame key {frame_key!r} cannot be a cache file name (use letters, "
                             "digits, '.', '_' and '-')")
        return self.directory / fingerprint / f"{frame_key}.safetensors"

    def get(self, fingerprint: str, frame_key: str) -> torch.Tensor | None:
        """The cached tokens ``(T, D)`` or ``None`` (missing or unreadable)."""
        path = self.path(fingerprint, frame_key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["tokens"]
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            log.warning("ignoring unreadable cache entry %s (%s)", path, exc)
            return None

    def put(self, fingerprint: str, frame_key: str, tokens: torch.Tensor) -> Path:
        if tokens.ndim != 2:
            raise ValueError(f"cache entries are (T, D) tokens, got {tuple(tokens.shape)}")
        path = self.path(fingerprint, frame_key)
        tensors = {"tokens": tokens.detach().to("cpu", torch.float32).contiguous()}
        atomic_write(path, lambda p: save_file(tensors, str(p)))
        return path

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self.path(*key).is_file()

    def keys(self, fingerprint: str) -> list[str]:
        """The frame keys cached for one encoder fingerprint."""
        folder = self.directory / fingerprint
        return sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []


def encode_frames(encoder: Encoder, frame_ids: Sequence[str], load_frame: Callable[[str], Frame],
                  cache: FeatureCache | None = None, batch_size: int = 16,
                  progress: bool = True, key_of: Callable[[str], str] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Tokens ``(T, D)`` (CPU, float32) for every frame id, from ``cache`` where present;
    the rest are loaded with ``load_frame``, encoded in batches and stored.

    ``key_of`` maps a frame id to its cache key (it must change with the frame's content,
    e.g. :meth:`scenes.dataset.QADataset.cache_key`); without it every frame is loaded to
    hash its content.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fingerprint = encoder.fingerprint() if cache is not None else ""
    if key_of is None:
        def key_of(frame_id: str) -> str:
            return f"{frame_id}.{load_frame(frame_id).content_digest()[:16]}"
    keys: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    todo: list[str] = []
    for frame_id in dict.fromkeys(frame_ids):
        if cache is not None:
            keys[frame_id] = key_of(frame_id)
        hit = cache.get(fingerprint, keys[frame_id]) if cache is not None else None
        if hit is not None and hit.shape == (encoder.num_tokens, encoder.dim):
            out[frame_id] = hit
        else:
            todo.append(frame_id)
    log.info("%s: %d cached, %d to encode", encoder.kind, len(out), len(todo))
    bar = tqdm(total=len(todo), desc=f"encoding ({encoder.kind})", unit="frame",
               disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        ids = todo[start:start + batch_size]
        tokens = encoder.encode([load_frame(i) for i in ids]).cpu()
        for frame_id, t in zip(ids, tokens):
            out[frame_id] = t.clone()
            if cache is not None:
                cache.put(fingerprint, keys[frame_id], out[frame_id])
        bar.update(len(ids))
    bar.close()
    return {frame_id: out[frame_id] for frame_id in dict.fromkeys(frame_ids)}
