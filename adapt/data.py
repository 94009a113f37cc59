"""From a dataset on disk (synthetic world or nuScenes-QA) to :class:`FeatureSet` s.

Frames are encoded once by the frozen encoders; with a :class:`encoders.cache.FeatureCache`
the tokens are kept on disk, keyed by the encoder's fingerprint, so later runs (and a
changed encoder) do the right thing without re-encoding by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from adapt.features import FeatureSet
from aligners.config import ModalitySpec
from encoders.base import Encoder
from encoders.cache import FeatureCache, encode_frames
from scenes.dataset import QADataset

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """The feature sets an experiment needs, by context."""

    day_train: FeatureSet
    day_val: FeatureSet
    day_test: FeatureSet
    night_train: FeatureSet
    night_val: FeatureSet
    night_test: FeatureSet


def modality_specs(encoders: Mapping[str, Encoder]) -> dict[str, ModalitySpec]:
    """What the aligners need to know about each modality's tokens."""
    return {m: ModalitySpec(m, embed_dim=e.dim, num_tokens=e.num_tokens)
            for m, e in encoders.items()}


def dataset_features(data: QADataset, encoders: Mapping[str, Encoder],
                     cache: FeatureCache | None = None, *, progress: bool = True,
                     batch_size: int = 16) -> FeatureSet:
    """Encode every frame ``data`` asks about with each encoder (cached) → a FeatureSet."""
    frame_ids = sorted({item.frame_id for item in data.items})
    tokens = {
        modality: encode_frames(encoder, frame_ids, data.frame, cache,
                                batch_size=batch_size, progress=progress,
                                key_of=data.cache_key)
        for modality, encoder in encoders.items()
    }
    return FeatureSet(data.items, tokens)


def live_features(split, encoder_of: Callable[[str], Encoder], modalities: Iterable[str],
                  batch_size: int = 16) -> tuple[FeatureSet, FeatureSet]:
    """Train and validation :class:`FeatureSet` s of a live split
    (:class:`daemon.samples.LiveSplit`): its frames' *stored* sensor buffers encoded by the
    frozen encoder of each modality (``encoder_of(modality)``), in batches.

    Tokens come from :meth:`Encoder.encode` (``no_grad``, not ``inference_mode``: they feed
    training)."""
    keys = sorted(split.frames)
    tokens: dict[str, dict[str, torch.Tensor]] = {}
    for modality in sorted(set(modalities)):
        encoder = encoder_of(modality)
        per_frame: dict[str, torch.Tensor] = {}
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            encoded = encoder.encode([split.frames[k] for k in chunk])
            per_frame.update({k: encoded[i].clone() for i, k in enumerate(chunk)})
        tokens[modality] = per_frame
    return FeatureSet(split.train, tokens), FeatureSet(split.val, tokens)


def load_splits(root: str | Path, encoders: Mapping[str, Encoder],
                cache: FeatureCache | None = None, *, progress: bool = True) -> Splits:
    """Day/night × train/val/test feature sets of a dataset directory."""
    out = {}
    for split in ("train", "val", "test"):
        data = QADataset.load(root, split)
        for night, label in ((False, "day"), (True, "night")):
            part = data.filter(night=night)
            if len(part) == 0:
                raise ValueError(f"{root}: no {label} questions in split {split!r}")
            out[f"{label}_{split}"] = dataset_features(part, encoders, cache, progress=progress)
            log.info("%s %s: %d questions", label, split, len(part))
    return Splits(**out)
