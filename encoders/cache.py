"""A disk cache of encoder outputs per frame, keyed by the encoder's fingerprint.

Frozen encoders give the same tokens for the same frame every time, so aligner training and
benchmarks encode each frame once. Layout::

    DIR/<fingerprint>/<frame id>.safetensors     {"tokens": (T, D) float32}

Because the fingerprint hashes kind, config and every weight, a changed encoder reads from
another folder and simply misses. Writes go to a temporary file that is renamed into place,
so a crash never leaves a half-written entry; an unreadable entry counts as a miss.
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
from scenes.sample import Frame

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{16,64}$")


class FeatureCache:
    """Encoder outputs per (encoder fingerprint, frame id) under ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, fingerprint: str, frame_id: str) -> Path:
        if not _FINGERPRINT.match(fingerprint):
            raise ValueError(f"not an encoder fingerprint: {fingerprint!r}")
        if not _SAFE_ID.match(frame_id) or ".." in frame_id:
            raise ValueError(f"frame id {frame_id!r} cannot be a cache file name (use letters, "
                             "digits, '.', '_' and '-')")
        return self.directory / fingerprint / f"{frame_id}.safetensors"

    def get(self, fingerprint: str, frame_id: str) -> torch.Tensor | None:
        """The cached tokens ``(T, D)`` or ``None`` (missing or unreadable)."""
        path = self.path(fingerprint, frame_id)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["tokens"]
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            log.warning("ignoring unreadable cache entry %s (%s)", path, exc)
            return None

    def put(self, fingerprint: str, frame_id: str, tokens: torch.Tensor) -> Path:
        if tokens.ndim != 2:
            raise ValueError(f"cache entries are (T, D) tokens, got {tuple(tokens.shape)}")
        path = self.path(fingerprint, frame_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"tokens": tokens.detach().to("cpu", torch.float32).contiguous()}, str(tmp))
        os.replace(tmp, path)
        return path

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self.path(*key).is_file()

    def frame_ids(self, fingerprint: str) -> list[str]:
        folder = self.directory / fingerprint
        return sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []


def encode_frames(encoder: Encoder, frame_ids: Sequence[str], load_frame: Callable[[str], Frame],
                  cache: FeatureCache | None = None, batch_size: int = 16,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Tokens ``(T, D)`` (CPU, float32) for every frame id, from ``cache`` where present;
    the rest are loaded with ``load_frame``, encoded in batches and stored."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fingerprint = encoder.fingerprint() if cache is not None else ""
    out: dict[str, torch.Tensor] = {}
    todo: list[str] = []
    for frame_id in dict.fromkeys(frame_ids):
        hit = cache.get(fingerprint, frame_id) if cache is not None else None
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
                cache.put(fingerprint, frame_id, out[frame_id])
        bar.update(len(ids))
    bar.close()
    return {frame_id: out[frame_id] for frame_id in dict.fromkeys(frame_ids)}
