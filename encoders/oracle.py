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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from encoders.base import Encoder, check_frames
from scenes.layout import CLASS_NAMES
from scenes.questions import RELATIONS, sector_index
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


@dataclass
class OracleConfig:
    """Attributes:
        max_objects: tokens per frame (nearest objects first; the default world annotates
            10-25 objects per frame within 40 m).
        scale: metres per unit of the position and size features.
        seed: unused (no weights); kept so every encoder config has one.
    """

    max_objects: int = 32
    scale: float = 20.0
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.max_objects) < 1:
            raise ValueError(f"OracleConfig.max_objects must be >= 1, got {self.max_objects}")
        if not self.scale > 0:
            raise ValueError(f"OracleConfig.scale must be > 0, got {self.scale}")


def object_features(frame: Frame, max_objects: int, scale: float) -> np.ndarray:
    """``(max_objects, len(FEATURE_NAMES))`` float32 features of ``frame``'s objects."""
    if frame.objects is None:
        raise ValueError(f"oracle: frame {frame.frame_id} has no ground-truth objects (the "
                         "oracle needs annotated frames: the synthetic world or nuScenes)")
    out = np.zeros((max_objects, len(FEATURE_NAMES)), dtype=np.float32)
    objects = sorted(frame.objects, key=lambda o: math.hypot(o.center[0], o.center[1]))
    n_cls, n_stat = len(CLASS_NAMES), len(STATUSES)
    for row, obj in zip(out, objects[:max_objects]):
        x, y, z = obj.center
        distance = math.hypot(x, y)
        bearing = math.atan2(y, x)
        sector = int(sector_index(np.float64(x), np.float64(y)))  # as the questions see it
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


class OracleEncoder(Encoder):
    """Ground-truth objects -> ``(B, max_objects, len(FEATURE_NAMES))`` tokens."""

    kind = "oracle"
    modality = "oracle"
    config_class = OracleConfig

    @property
    def num_tokens(self) -> int:
        return int(self.config.max_objects)

    @property
    def dim(self) -> int:
        return len(FEATURE_NAMES)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.num_tokens, self.dim)

    def preprocess(self, frames: Sequence[Frame]) -> torch.Tensor:
        check_frames(frames, f"{self.kind}.preprocess")
        c = self.config
        return torch.from_numpy(np.stack([object_features(f, c.max_objects, c.scale)
                                          for f in frames]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1:] != (self.num_tokens, self.dim):
            raise ValueError(f"{self.kind}.forward expects (B, {self.num_tokens}, {self.dim}), "
                             f"got {tuple(x.shape)}")
        return x.float()
