"""QA items paired with the frozen encoders' tokens of their frames.

Encoders are frozen, so a frame's tokens never change during training: each frame is
encoded once (and cached on disk by :class:`encoders` when a cache is given) and every
question about it reuses them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from scenes.sample import QAItem

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A training/evaluation batch: questions, answers and tokens per modality ``(B, T, D)``."""

    indices: list[int]
    questions: list[str]
    answers: list[str]
    template_types: list[str]
    num_hops: list[int]
    tokens: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.indices)


class FeatureSet:
    """QA items and, per modality, the tokens ``(T, D)`` of every frame they ask about."""

    def __init__(self, items: Sequence[QAItem], tokens: Mapping[str, Mapping[str, torch.Tensor]]):
        self.items = list(items)
        self.tokens = {m: dict(t) for m, t in tokens.items()}
        for modality, per_frame in self.tokens.items():
            missing = {it.frame_id for it in self.items} - set(per_frame)
            if missing:
                raise ValueError(
                    f"{modality}: no tokens for {len(missing)} frames, e.g. {sorted(missing)[:3]}"
                )

    @property
    def modalities(self) -> list[str]:
        return list(self.tokens)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> FeatureSet:
        return FeatureSet([self.items[i] for i in indices], self.tokens)

    def fraction(self, fraction: float, seed: int = 0) -> FeatureSet:
        """A deterministic random ``fraction`` of the items (for data-efficiency runs)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        order = list(range(len(self.items)))
        random.Random(seed).shuffle(order)
        return self.subset(sorted(order[: max(1, round(fraction * len(order)))]))

    def at_most(self, n: int | None, seed: int = 0) -> FeatureSet:
        """A deterministic random subset of about ``n`` items (:meth:`fraction` of
        ``n / len``); ``self`` when ``n`` is ``None`` or not smaller than the set."""
        return self if n is None or n >= len(self) else self.fraction(n / len(self), seed=seed)

    def with_swapped_frames(self, seed: int = 0) -> FeatureSet:
        """The same questions, each paired with *another* frame's tokens.

        Frames are permuted by a random derangement (no frame keeps its own tokens), so a
        model that reads its sensors loses accuracy here and one that answers from the
        question alone does not: see :func:`adapt.evaluate.grounding`.
        """
        frames = sorted({it.frame_id for it in self.items})
        if len(frames) < 2:
            raise ValueError("swapping frames needs questions about at least two frames")
        rng = random.Random(seed)
        shifted = frames[:]
        rng.shuffle(shifted)
        # A random cyclic shift of a shuffled order: every frame moves, none stays.
        partner = {a: shifted[(i + 1) % len(shifted)] for i, a in enumerate(shifted)}
        tokens = {m: {f: per_frame[partner[f]] for f in frames}
                  for m, per_frame in self.tokens.items()}
        return FeatureSet(self.items, tokens)

    def batch(self, indices: Sequence[int], modalities: Sequence[str] | None = None) -> Batch:
        mods = self.modalities if modalities is None else list(modalities)
        items = [self.items[i] for i in indices]
        unknown = [m for m in mods if m not in self.tokens]
        if unknown:
            raise KeyError(f"no tokens for modalities {unknown}; have {self.modalities}")
        return Batch(
            indices=list(indices),
            questions=[it.question for it in items],
            answers=[it.answer for it in items],
            template_types=[it.template_type for it in items],
            num_hops=[it.num_hop for it in items],
            tokens={m: torch.stack([self.tokens[m][it.frame_id] for it in items]) for m in mods},
        )

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        modalities: Sequence[str] | None = None,
    ) -> Iterator[Batch]:
        order = list(range(len(self.items)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size], modalities)
