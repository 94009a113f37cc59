"""The oracle "encoder": tokens made from a frame's ground-truth objects, not from a sensor.

It is the synthetic world's counterpart of nuScenes-QA's ground-truth-boxes upper bound
(Qian et al., AAAI'24: 84.3 % with ground-truth boxes against 53.4 % question-only): what the
question side (aligners, connections, LoRA, the LLM) can reach when the scene is known
exactly. It tells a recipe problem from an encoder problem — if mPnP cannot learn from
these tokens, no sensor encoder will help. It is a diagnostic and a Table 1 row only: its
modality is ``oracle``, which no context policy selects and the daemon never serves.

One token per annotated object, nearest first, up to ``max_objects`` (further objects are
dropped; empty slots are all-zero tokens with the ``present`` feature at 0). Features of a
token, in order (:data:`FEATURE_NAMES`): class one-hot, status one-hot (incl. "none"),
x / y / z in units of ``scale`` metres, distance, sine and cosine of the bearing, the
nuScenes-QA direction sector one-hot (front, front left, back left, back, back right, front
right), sine and cosine of the heading, width / length / height, present.

With ``summaries`` on, one more token per object filter of the questions (a class, a class
with a status, or a status: :data:`scenes.questions.FILTERS`) follows the object tokens: the
filter's class and status in the same one-hot slots, ``summary`` = 1, its count as a
thermometer (``count>=1`` ... ``count>=10``) and the shares of each status and each class
among the objects it picks out. A whole-scene question ("Are there any parked cars?", "How
many pedestrians are there?") is then answered by *one* token: single-token retrieval, which
attention does, instead of a count over many tokens, which softmax attention (a mean, not a
sum) does badly. It tells whether the LLM side can read such answers at all, and is the
shape the sensor encoders' tokens should take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from encoders.base import Encoder, check_frames
from encoders.targets import object_phrase
from scenes.layout import CLASS_NAMES
from scenes.questions import (
    FILTERS,
    MAX_COUNT,
    RELATIONS,
    SceneGraph,
    noun_phrase,
    sector_index,
)
from scenes.sample import Frame

#: Every status of the world, then "none" (traffic cones and barriers have none).
STATUSES: tuple[str, ...] = ("moving", "stopped", "parked", "standing", "not standing",
                             "with rider", "without rider", "none")
FEATURE_NAMES: tuple[str, ...] = (
    *(f"class={c}" for c in CLASS_NAMES), *(f"status={s}" for s in STATUSES),
    "x", "y", "z", "distance", "bearing_sin", "bearing_cos",
    *(f"sector={r}" for r in RELATIONS), "heading_sin", "heading_cos",
    "width", "length", "height", "present",
)
#: Trailing features of the summary tokens (all zero in object tokens).
SUMMARY_FEATURES: tuple[str, ...] = (
    "summary", *(f"count>={k}" for k in range(1, MAX_COUNT + 1)),
    *(f"share status={s}" for s in STATUSES), *(f"share class={c}" for c in CLASS_NAMES),
)
#: The filters a summary token is made for (every question filter but "things").
SUMMARY_FILTERS: tuple[tuple[str | None, str | None], ...] = tuple(
    f for f in FILTERS if f != (None, None))


@dataclass
class OracleConfig:
    """Attributes:
        max_objects: tokens per frame (nearest objects first; the default world annotates
            10-25 objects per frame within 40 m).
        scale: metres per unit of the position and size features.
        summaries: append one summary token per question filter (module docstring).
        seed: unused (no weights); kept so every encoder config has one.
    """

    max_objects: int = 32
    scale: float = 20.0
    summaries: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.max_objects) < 1:
            raise ValueError(f"OracleConfig.max_objects must be >= 1, got {self.max_objects}")
        if not self.scale > 0:
            raise ValueError(f"OracleConfig.scale must be > 0, got {self.scale}")


def _annotated(frame: Frame) -> list:
    """``frame``'s ground-truth objects; a clear error for a frame without them."""
    if frame.objects is None:
        raise ValueError(f"oracle: frame {frame.frame_id} has no ground-truth objects (the "
                         "oracle needs annotated frames: the synthetic world or nuScenes)")
    return list(frame.objects)


def _nearest(frame: Frame, max_objects: int) -> list:
    """The ``max_objects`` annotated objects nearest the vehicle, nearest first."""
    objects = sorted(_annotated(frame), key=lambda o: math.hypot(o.center[0], o.center[1]))
    return objects[:max_objects]


def _sector(obj) -> int:
    """Index into RELATIONS of the object's direction, as the questions see it."""
    return int(sector_index(np.float64(obj.center[0]), np.float64(obj.center[1])))


def object_features(frame: Frame, max_objects: int, scale: float) -> np.ndarray:
    """``(max_objects, len(FEATURE_NAMES))`` float32 features of ``frame``'s objects."""
    out = np.zeros((max_objects, len(FEATURE_NAMES)), dtype=np.float32)
    n_cls, n_stat = len(CLASS_NAMES), len(STATUSES)
    for row, obj in zip(out, _nearest(frame, max_objects)):
        x, y, z = obj.center
        distance = math.hypot(x, y)
        bearing = math.atan2(y, x)
        sector = _sector(obj)
        if obj.category in CLASS_NAMES:
            row[CLASS_NAMES.index(obj.category)] = 1.0
        row[n_cls + STATUSES.index(obj.status if obj.status in STATUSES else "none")] = 1.0
        i = n_cls + n_stat
        row[i:i + 6] = (x / scale, y / scale, z / scale, distance / scale,
                        math.sin(bearing), math.cos(bearing))
        row[i + 6 + sector] = 1.0
        w, length, h = obj.size
        row[i + 12:] = (math.sin(obj.yaw), math.cos(obj.yaw), w / scale * 4, length / scale * 4,
                        h / scale * 4, 1.0)
    return out


def describe_scene(frame: Frame, max_objects: int = 32) -> str:
    """The oracle's objects as words ("objects: parked car front left, barrier back, ..."),
    nearest first: the scene a question-side model reads as *text* (``mpnp bench grounding``'s
    ``oracle-text`` row), against which aligned tokens are compared."""
    return "objects: " + ", ".join(object_phrase(o) for o in _nearest(frame, max_objects)) + "."


def _picked_by_filter(frame: Frame) -> list[list]:
    """Per summary filter, the annotated objects it picks out, by the questions' own filter
    membership (:class:`scenes.questions.SceneGraph`), so summaries count as questions do."""
    objects = _annotated(frame)
    member = SceneGraph(objects).member
    return [[o for o, m in zip(objects, member[FILTERS.index(f)]) if m]
            for f in SUMMARY_FILTERS]


def summary_phrases(frame: Frame) -> list[str]:
    """Each summary token's count in words, as the questions name its filter ("3 parked
    cars", "1 bus", "no trucks"): what text anchoring maps the summary tokens onto."""
    return [f"{len(picked) or 'no'} {noun_phrase(cat, status, plural=len(picked) != 1)}"
            for (cat, status), picked in zip(SUMMARY_FILTERS, _picked_by_filter(frame))]


def summary_features(frame: Frame) -> np.ndarray:
    """``(len(SUMMARY_FILTERS), len(FEATURE_NAMES) + len(SUMMARY_FEATURES))`` float32: one
    token per filter, as the questions count (every annotated object, not only the nearest)."""
    n_cls, n_stat, base = len(CLASS_NAMES), len(STATUSES), len(FEATURE_NAMES)
    out = np.zeros((len(SUMMARY_FILTERS), base + len(SUMMARY_FEATURES)), dtype=np.float32)
    for row, (cat, status), picked in zip(out, SUMMARY_FILTERS, _picked_by_filter(frame)):
        if cat is not None:
            row[CLASS_NAMES.index(cat)] = 1.0
        if status is not None:
            row[n_cls + STATUSES.index(status)] = 1.0
        row[base] = 1.0
        count = min(len(picked), MAX_COUNT)
        row[base + 1:base + 1 + count] = 1.0
        share = base + 1 + MAX_COUNT
        for o in picked:
            st = o.status if o.status in STATUSES else "none"
            row[share + STATUSES.index(st)] += 1.0 / len(picked)
            if o.category in CLASS_NAMES:
                row[share + n_stat + CLASS_NAMES.index(o.category)] += 1.0 / len(picked)
    return out


class OracleEncoder(Encoder):
    """Ground-truth objects -> ``(B, max_objects, len(FEATURE_NAMES))`` tokens."""

    kind = "oracle"
    modality = "oracle"
    config_class = OracleConfig

    @property
    def num_tokens(self) -> int:
        summaries = len(SUMMARY_FILTERS) if self.config.summaries else 0
        return int(self.config.max_objects) + summaries

    @property
    def dim(self) -> int:
        return len(FEATURE_NAMES) + (len(SUMMARY_FEATURES) if self.config.summaries else 0)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.num_tokens, self.dim)

    def preprocess(self, frames: Sequence[Frame]) -> torch.Tensor:
        check_frames(frames, f"{self.kind}.preprocess")
        c = self.config
        rows = []
        for frame in frames:
            tokens = object_features(frame, c.max_objects, c.scale)
            if c.summaries:
                tokens = np.concatenate([np.pad(tokens, ((0, 0), (0, len(SUMMARY_FEATURES)))),
                                         summary_features(frame)])
            rows.append(tokens)
        return torch.from_numpy(np.stack(rows))

    def describe_tokens(self, frame: Frame) -> list[str | None]:
        """Each object token's object in words (:func:`encoders.targets.object_phrase`),
        empty slots nothing (``None``), then each summary token's count in words
        (:func:`summary_phrases`)."""
        max_objects = int(self.config.max_objects)
        words: list[str | None] = [object_phrase(o) for o in _nearest(frame, max_objects)]
        words += [None] * (max_objects - len(words))
        return words + (summary_phrases(frame) if self.config.summaries else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1:] != (self.num_tokens, self.dim):
            raise ValueError(f"{self.kind}.forward expects (B, {self.num_tokens}, {self.dim}), "
                             f"got {tuple(x.shape)}")
        return x.float()
