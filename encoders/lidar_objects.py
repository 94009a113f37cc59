"""LiDAR object encoder: the sweep cut into object segments, one token per segment.

The range-image ViT (:mod:`encoders.lidar`) sees the sweep at a quarter of its azimuth
resolution (128 of the sensor's 512 columns) and has to find the objects in it itself; its
probes and the LLM's reading of its tokens stay near the answer prior. AV stacks instead put
an object-level front end on the LiDAR, and nuScenes-QA's models read object features from a
detector (Qian et al., AAAI'24). This encoder does the same in the smallest form that is
still a real LiDAR encoder:

1. **Segmentation without learning** (:func:`segment_sweep`): returns near the road surface
   are dropped, and the remaining returns are linked to their range-image neighbours when
   they lie within a range-dependent distance of each other (range-image segmentation in
   the manner of Bogoslavskyi & Stachniss, "Fast range image-based segmentation of sparse
   3D laser scans", IROS 2016); linked returns form a segment (connected components).
2. **Geometric features per segment** (:data:`FEATURES`): where it is (centroid, distance,
   bearing), its shape (extent along and across its principal axis, height range, axis
   orientation), how much of it the sensor saw (returns, angular span, nearest range) and
   how it reflects (intensity mean / spread / maximum) — what a LiDAR can know of an object.
3. **A learned embedding**: a shared MLP per segment, then transformer blocks over the
   segments (context: a car in the parking strip next to others is parked).

Tokens are the ``max_segments`` segments nearest the vehicle, nearest first; empty places
hold a learned "nothing" token. Pretraining (:mod:`encoders.pretrain`) teaches every token
to name the ground-truth object its segment belongs to — class, status, distance ring,
direction — or "nothing" (walls, kerbs, fragments): :meth:`LidarObjectsEncoder.slot_targets`
matches segments to annotated boxes by their returns, and :meth:`describe_tokens` gives text
anchoring the same words. The whole scene is one region (``("bands", 1)``), so the region
count targets are whole-scene counts.

Nothing depends on light: night does not change a token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from encoders.base import Encoder, check_frames, init_from_generator
from encoders.targets import IGNORE, OBJECT_FIELDS, object_fields, object_phrase
from scenes.layout import CLASS_NAMES
from scenes.lidar import FOV_DOWN_DEG, FOV_UP_DEG, LIDAR_HEIGHT
from scenes.range_image import range_image_pixels
from scenes.sample import Frame

#: Per-segment input features, in order (positions and sizes in units of ``scale`` metres).
FEATURES: tuple[str, ...] = (
    "x", "y", "z_min", "z_max", "z_mean", "distance", "bearing_sin", "bearing_cos",
    "length", "width", "axis_sin2", "axis_cos2", "log_points", "intensity_mean",
    "intensity_std", "intensity_max", "range_min", "angular_span", "present",
)
_PRESENT = FEATURES.index("present")
#: Neighbours a return is linked to in the range image: (row step, column step).
_NEIGHBOURS: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 0), (1, -1), (1, 1), (2, 0))


@dataclass
class LidarObjectsConfig:
    """Attributes:
        max_segments: tokens per frame (nearest segments first).
        beams / width: the sweep's range-image geometry (the world's LiDAR: 32 x 512).
        ground_height: returns lower than this (metres above the road) are ground (road,
            kerbs, sidewalks at 0.15 m) and dropped.
        link_distance / link_per_metre: two neighbouring returns belong to one segment when
            they are closer than ``link_distance + link_per_metre * range`` metres (beams
            spread with range).
        min_points: segments with fewer returns are dropped (the world annotates objects
            with at least 3).
        max_range: metres (planar); returns further away are dropped.
        scale: metres per unit of the position and size features.
        hidden / embed_dim: widths of the segment MLP and of the tokens.
        depth / num_heads: transformer blocks over the segments.
        seed: initialisation seed (a private generator).
    """

    max_segments: int = 48
    beams: int = 32
    width: int = 512
    ground_height: float = 0.3
    link_distance: float = 0.3
    link_per_metre: float = 0.03
    min_points: int = 3
    max_range: float = 60.0
    scale: float = 20.0
    hidden: int = 128
    embed_dim: int = 128
    depth: int = 2
    num_heads: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_segments", "beams", "width", "min_points", "hidden", "embed_dim",
                     "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LidarObjectsConfig.{name} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.depth < 0:
            raise ValueError(f"LidarObjectsConfig.depth must be >= 0, got {self.depth}")
        for name in ("link_distance", "max_range", "scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LidarObjectsConfig.{name} must be > 0, got "
                                 f"{getattr(self, name)}")
        if self.link_per_metre < 0:
            raise ValueError(f"LidarObjectsConfig.link_per_metre must be >= 0, got "
                             f"{self.link_per_metre}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"LidarObjectsConfig.embed_dim {self.embed_dim} must be divisible "
                             f"by num_heads {self.num_heads}")


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the graph on ``n`` nodes with edges ``a[i] - b[i]``: the
    smallest node index of each node's component (vectorised hooking + pointer jumping)."""
    parent = np.arange(n)
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            return parent
        lo, hi = np.minimum(pa[differ], pb[differ]), np.maximum(pa[differ], pb[differ])
        np.minimum.at(parent, hi, lo)
        while True:  # compress: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def segment_sweep(points: np.ndarray, config: LidarObjectsConfig) -> np.ndarray:
    """Segment id of every return of a sweep ``(N, >=3)`` (sensor frame), ``-1`` for dropped
    returns (ground, too far, or in a segment of fewer than ``min_points``); ids are 0..S-1
    in order of the segments' planar centroid distance (nearest first)."""
    c = config
    labels = np.full(len(points), -1, dtype=np.int64)
    if len(points) == 0:
        return labels
    xyz = np.asarray(points[:, :3], dtype=np.float64)
    rng = np.linalg.norm(xyz, axis=1)
    keep = np.flatnonzero((xyz[:, 2] + LIDAR_HEIGHT >= c.ground_height) & (rng > 1e-3)
                          & (np.hypot(xyz[:, 0], xyz[:, 1]) <= c.max_range))
    if len(keep) == 0:
        return labels
    p, r = xyz[keep], rng[keep]
    row, col = range_image_pixels(p, r, c.beams, c.width, FOV_UP_DEG, FOV_DOWN_DEG)
    row, col = np.clip(row, 0, c.beams - 1), col % c.width
    grid = np.full((c.beams, c.width), -1, dtype=np.int64)
    grid[row, col] = np.arange(len(keep))
    # Returns that share a pixel (denser clouds than the sensor's grid) join its occupant.
    occupant = grid[row, col]
    edges_a, edges_b = [np.arange(len(keep))], [occupant]
    for dr, dc in _NEIGHBOURS:
        first = grid[:c.beams - dr]
        second = np.roll(grid, -dc, axis=1)[dr:]
        both = (first >= 0) & (second >= 0)
        i, j = first[both], second[both]
        gap = np.linalg.norm(p[i] - p[j], axis=1)
        near = gap < c.link_distance + c.link_per_metre * np.minimum(r[i], r[j])
        edges_a.append(i[near])
        edges_b.append(j[near])
    gap = np.linalg.norm(p - p[occupant], axis=1)
    far = gap >= c.link_distance + c.link_per_metre * r
    edges_b[0] = np.where(far, edges_a[0], occupant)
    root = _components(len(keep), np.concatenate(edges_a), np.concatenate(edges_b))
    _, segment = np.unique(root, return_inverse=True)
    sizes = np.bincount(segment)
    cx = np.bincount(segment, p[:, 0]) / sizes
    cy = np.bincount(segment, p[:, 1]) / sizes
    big = np.flatnonzero(sizes >= c.min_points)
    order = big[np.argsort(np.hypot(cx[big], cy[big]), kind="stable")]
    rank = np.full(len(sizes), -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    labels[keep] = rank[segment]
    return labels


def segment_features(points: np.ndarray, labels: np.ndarray, count: int,
                     config: LidarObjectsConfig) -> np.ndarray:
    """``(count, len(FEATURES))`` float32 features of segments ``0..count-1`` (:data:`FEATURES`;
    rows of absent segments are zero)."""
    c = config
    out = np.zeros((count, len(FEATURES)), dtype=np.float32)
    inside = (labels >= 0) & (labels < count)
    if not inside.any():
        return out
    seg = labels[inside]
    p = np.asarray(points[inside, :4], dtype=np.float64)
    x, y, z, inten = p[:, 0], p[:, 1], p[:, 2] + LIDAR_HEIGHT, p[:, 3]
    n = np.bincount(seg, minlength=count).astype(np.float64)
    present = n > 0
    safe = np.maximum(n, 1.0)

    def mean(v: np.ndarray) -> np.ndarray:
        return np.bincount(seg, v, minlength=count) / safe

    def extreme(v: np.ndarray, ufunc: np.ufunc, start: float) -> np.ndarray:
        acc = np.full(count, start)
        ufunc.at(acc, seg, v)
        return np.where(present, acc, 0.0)

    cx, cy = mean(x), mean(y)
    dx, dy = x - cx[seg], y - cy[seg]
    sxx, syy, sxy = mean(dx * dx), mean(dy * dy), mean(dx * dy)
    axis = 0.5 * np.arctan2(2 * sxy, sxx - syy)  # principal axis of the returns in x-y
    along = dx * np.cos(axis[seg]) + dy * np.sin(axis[seg])
    across = -dx * np.sin(axis[seg]) + dy * np.cos(axis[seg])
    length = extreme(along, np.maximum, -np.inf) - extreme(along, np.minimum, np.inf)
    width = extreme(across, np.maximum, -np.inf) - extreme(across, np.minimum, np.inf)
    distance = np.hypot(cx, cy)
    bearing = np.arctan2(cy, cx)
    offset = (np.arctan2(y, x) - bearing[seg] + math.pi) % (2 * math.pi) - math.pi
    span = extreme(offset, np.maximum, -np.inf) - extreme(offset, np.minimum, np.inf)
    i_mean = mean(inten)
    i_std = np.sqrt(np.maximum(mean(inten * inten) - i_mean ** 2, 0.0))
    columns = [cx / c.scale, cy / c.scale, extreme(z, np.minimum, np.inf) / 2.0,
               extreme(z, np.maximum, -np.inf) / 2.0, mean(z) / 2.0, distance / c.scale,
               np.sin(bearing), np.cos(bearing), length / 4.0, width / 4.0,
               np.sin(2 * axis), np.cos(2 * axis), np.log1p(n) / 5.0, i_mean, i_std,
               extreme(inten, np.maximum, -np.inf),
               extreme(np.hypot(x, y), np.minimum, np.inf) / c.scale, span / (math.pi / 4),
               np.ones(count)]
    out[:] = np.stack(columns, axis=1)
    out[~present] = 0.0
    return out


def match_segments(points: np.ndarray, labels: np.ndarray, count: int, objects: list,
                   margin: float = 0.2) -> list:
    """The annotated object each segment ``0..count-1`` shows, or ``None``: the object whose
    box (grown by ``margin`` metres) holds most of the segment's returns, when that is at
    least half of them; an object seen as several segments belongs to its largest one only
    (the other fragments say "nothing", so that counting tokens counts objects)."""
    inside_any = (labels >= 0) & (labels < count)
    result: list = [None] * count
    if not inside_any.any() or not objects:
        return result
    seg = labels[inside_any]
    p = np.asarray(points[inside_any, :3], dtype=np.float64).copy()
    p[:, 2] += LIDAR_HEIGHT  # sensor frame -> ego frame
    sizes = np.bincount(seg, minlength=count)
    hits = np.zeros((count, len(objects)), dtype=np.int64)
    for k, obj in enumerate(objects):
        rel = p - np.asarray(obj.center, dtype=np.float64)
        cos, sin = math.cos(obj.yaw), math.sin(obj.yaw)
        lx, ly = cos * rel[:, 0] + sin * rel[:, 1], -sin * rel[:, 0] + cos * rel[:, 1]
        w, length, h = obj.size
        box = ((np.abs(lx) <= length / 2 + margin) & (np.abs(ly) <= w / 2 + margin)
               & (np.abs(rel[:, 2]) <= h / 2 + margin))
        hits[:, k] = np.bincount(seg[box], minlength=count)
    best = hits.argmax(axis=1)
    owned = hits[np.arange(count), best] * 2 >= np.maximum(sizes, 1)
    owned &= sizes > 0
    for k in np.unique(best[owned]):
        candidates = np.flatnonzero(owned & (best == k))
        winner = candidates[np.argmax(hits[candidates, k])]
        result[winner] = objects[k]
    return result


class LidarObjectsEncoder(Encoder):
    """LiDAR sweep -> ``(B, max_segments, embed_dim)`` tokens, one per segment, nearest
    first (module docstring)."""

    kind = "lidar-objects"
    modality = "lidar"
    sensor = "lidar"
    config_class = LidarObjectsConfig

    def __init__(self, config: LidarObjectsConfig) -> None:
        super().__init__(config)
        c = config
        feats = len(FEATURES)
        with torch.device("meta"):
            self.segment_mlp = nn.Sequential(nn.Linear(feats, c.hidden), nn.GELU(),
                                             nn.Linear(c.hidden, c.embed_dim), nn.GELU(),
                                             nn.Linear(c.embed_dim, c.embed_dim))
            self.empty_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
            self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, 2.0, qkv_bias=True)
                                        for _ in range(c.depth))
            self.norm = nn.LayerNorm(c.embed_dim)
        self.to_empty(device="cpu")
        init_from_generator(self, torch.Generator().manual_seed(int(c.seed)))

    @property
    def num_tokens(self) -> int:
        return self.config.max_segments

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @property
    def object_slots(self) -> int:
        return self.config.max_segments

    def region_layout(self) -> tuple[str, int]:
        return "bands", 1

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.config.max_segments, len(FEATURES))

    def _segments(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        points = np.asarray(frame.lidar)
        return points, segment_sweep(points, self.config)

    def preprocess(self, frames: Sequence[Frame]) -> torch.Tensor:
        """Frames -> ``(B, max_segments, len(FEATURES))`` segment features (absent: zeros)."""
        check_frames(frames, f"{self.kind}.preprocess")
        out = np.zeros((len(frames), self.config.max_segments, len(FEATURES)), np.float32)
        for b, frame in enumerate(frames):
            points, labels = self._segments(frame)
            out[b] = segment_features(points, labels, self.config.max_segments, self.config)
        return torch.from_numpy(out)

    def token_objects(self, frame: Frame) -> list:
        """The annotated object each token shows (``None``: nothing), by
        :func:`match_segments`; needs the frame's ground truth."""
        if frame.objects is None:
            raise ValueError(f"frame {frame.frame_id} has no ground-truth objects; pretraining "
                             "and anchoring need annotated frames (the synthetic world has them)")
        points, labels = self._segments(frame)
        return match_segments(points, labels, self.config.max_segments, list(frame.objects))

    def slot_targets(self, frames: Sequence[Frame]) -> np.ndarray:
        """Each token's object (:meth:`token_objects`) as :data:`OBJECT_FIELDS` targets
        ``(B, 1, max_segments, fields)``; "nothing" tokens have only a class target."""
        out = np.full((len(frames), 1, self.config.max_segments, len(OBJECT_FIELDS)), IGNORE,
                      dtype=np.int64)
        out[..., 0] = len(CLASS_NAMES)
        for b, frame in enumerate(frames):
            for k, obj in enumerate(self.token_objects(frame)):
                if obj is not None and obj.category in CLASS_NAMES:
                    out[b, 0, k] = object_fields(obj)
        return out

    def describe_tokens(self, frame: Frame) -> list[str | None]:
        """Each token's object in words (``"parked car front left"``) or ``"nothing"``."""
        return [object_phrase(o) if o is not None else "nothing"
                for o in self.token_objects(frame)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != len(FEATURES):
            raise ValueError(f"{self.kind}.forward expects (B, S, {len(FEATURES)}), got "
                             f"{tuple(x.shape)}")
        present = x[..., _PRESENT:_PRESENT + 1] > 0.5
        tokens = torch.where(present, self.segment_mlp(x),
                             self.empty_token.expand(x.shape[0], x.shape[1], -1))
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)
