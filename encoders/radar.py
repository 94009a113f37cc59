"""Radar encoder: the five radars' sparse returns -> a point-set encoder -> sector tokens.

Radar returns are few (tens per radar) and unordered, so the encoder is a set encoder in the
style of PointNet / PointPillars' pillar feature net: a shared MLP embeds every return
(position, bearing, range, radial velocity, RCS), the embeddings are max-pooled into cells —
``bands`` azimuth sectors (the LiDAR encoder's bands, :func:`encoders.targets.band_of`) times
``rings`` distance rings — together with each cell's log point count, and a few transformer
blocks mix the cells. Tokens are band-major (band 0's rings, then band 1's, ...), so each
azimuth band is a region for pretraining and probes, as for the LiDAR.

Radial velocity is an input feature, not something to infer: it is what lets the tokens say
*moving* versus *parked/stopped*. Nothing depends on light.

Initialisation draws from a private ``torch.Generator`` seeded by ``config.seed``: creating an
encoder neither reseeds nor advances the process's global random stream.
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
from scenes.radar import RADAR_MODEL_VERSION, RADAR_VIEWS, all_returns
from scenes.sample import Frame

#: Per-return input features, in order (then one channel: the cell index, -1 for padding).
FEATURES: tuple[str, ...] = ("x", "y", "z", "range", "bearing_sin", "bearing_cos",
                             "v_radial", "abs_v_radial", "rcs", "present")
_X, _Y, _SIN, _COS = 0, 1, 4, 5


@dataclass
class RadarPointConfig:
    """Sizes of the radar set encoder.

    Attributes:
        max_points: returns per frame kept (nearest first over all five radars; the world's
            radars give 40-120).
        max_range: metres; returns further away are dropped, positions are scaled by it.
        bands / rings: azimuth sectors x distance rings, one token each (ring edges at
            ``max_range * (i / rings) ** 1.5`` so that near rings are narrower).
        hidden / embed_dim: widths of the point MLP and of the tokens.
        depth / num_heads: transformer blocks over the cells.
        returns_version: the radar model (:data:`scenes.radar.RADAR_MODEL_VERSION`) the
            encoder was made for; part of its fingerprint, so feature caches of another
            radar model miss.
        seed: initialisation seed (a private generator).
    """

    max_points: int = 256
    max_range: float = 60.0
    bands: int = 8
    rings: int = 2
    hidden: int = 64
    embed_dim: int = 128
    depth: int = 2
    num_heads: int = 4
    returns_version: int = RADAR_MODEL_VERSION
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_points", "bands", "rings", "hidden", "embed_dim", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RadarPointConfig.{name} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.depth < 0:
            raise ValueError(f"RadarPointConfig.depth must be >= 0, got {self.depth}")
        if not self.max_range > 0:
            raise ValueError(f"RadarPointConfig.max_range must be > 0, got {self.max_range}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"RadarPointConfig.embed_dim {self.embed_dim} must be divisible "
                             f"by num_heads {self.num_heads}")

    def ring_edges(self) -> np.ndarray:
        return self.max_range * (np.arange(1, self.rings + 1) / self.rings) ** 1.5


class RadarPointEncoder(Encoder):
    """Five radars -> ``(B, bands * rings, embed_dim)`` tokens, band-major."""

    kind = "radar-pointnet"
    modality = "radar"
    sensor = "radar"
    config_class = RadarPointConfig

    def __init__(self, config: RadarPointConfig) -> None:
        super().__init__(config)
        c = config
        feats = len(FEATURES)
        # Built on the meta device (no values, so no draws from the global stream), then
        # materialised and initialised from the private generator.
        with torch.device("meta"):
            self.point_mlp = nn.Sequential(nn.Linear(feats, c.hidden), nn.GELU(),
                                           nn.Linear(c.hidden, c.embed_dim), nn.GELU(),
                                           nn.Linear(c.embed_dim, c.embed_dim))
            self.count_embed = nn.Linear(1, c.embed_dim)
            self.empty_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
            self.cell_embed = nn.Parameter(torch.zeros(1, c.bands * c.rings, c.embed_dim))
            self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, 2.0, qkv_bias=True)
                                        for _ in range(c.depth))
            self.norm = nn.LayerNorm(c.embed_dim)
        self.to_empty(device="cpu")
        init_from_generator(self, torch.Generator().manual_seed(int(c.seed)))

    @property
    def num_tokens(self) -> int:
        return self.config.bands * self.config.rings

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    def region_layout(self) -> tuple[str, int]:
        return "bands", self.config.bands

    def example_input(self, batch: int = 1) -> torch.Tensor:
        x = torch.zeros(batch, self.config.max_points, len(FEATURES) + 1)
        x[..., -1] = -1.0
        return x

    def cells(self, points: np.ndarray) -> np.ndarray:
        """The cell index (band * rings + ring) of every return ``(n, >=2)``; bands follow
        :func:`encoders.targets.band_of` (band 0 behind the vehicle, counter-clockwise)."""
        c = self.config
        azimuth = np.arctan2(points[:, 1], points[:, 0])
        wrapped = (azimuth + math.pi) % (2 * math.pi) - math.pi
        band = np.minimum((0.5 * (1.0 - wrapped / math.pi) * c.bands).astype(np.int64),
                          c.bands - 1)
        distance = np.hypot(points[:, 0], points[:, 1])
        ring = np.minimum(np.searchsorted(c.ring_edges(), distance), c.rings - 1)
        return band * c.rings + ring

    def preprocess(self, frames: Sequence[Frame]) -> torch.Tensor:
        """Frames -> ``(B, max_points, len(FEATURES) + 1)``: per return its features, then
        its cell index (``-1`` marks padding). A frame without radar data encodes as empty."""
        check_frames(frames, f"{self.kind}.preprocess")
        c = self.config
        out = np.zeros((len(frames), c.max_points, len(FEATURES) + 1), np.float32)
        out[..., -1] = -1.0
        for b, frame in enumerate(frames):
            payload = frame.payload(self.sensor)
            points = all_returns({k: payload[k] for k in RADAR_VIEWS if k in payload})
            distance = np.hypot(points[:, 0], points[:, 1])
            keep = np.flatnonzero(distance <= c.max_range)
            keep = keep[np.argsort(distance[keep], kind="stable")][:c.max_points]
            p, d = points[keep].astype(np.float64), distance[keep]
            n = len(keep)
            if n == 0:
                continue
            safe = np.maximum(d, 1e-6)
            out[b, :n, :len(FEATURES)] = np.stack([
                p[:, 0] / c.max_range, p[:, 1] / c.max_range, p[:, 2] / 3.0, d / c.max_range,
                p[:, 1] / safe, p[:, 0] / safe, p[:, 3] / 10.0, np.abs(p[:, 3]) / 10.0,
                p[:, 4] / 20.0, np.ones(n)], axis=1)
            out[b, :n, -1] = self.cells(p)
        return torch.from_numpy(out)

    def augment(self, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pretraining augmentation: rotate the whole scene by a whole number of bands
        (positions, bearings and cells rotate; radial velocity does not change), and the
        per-band targets ``y (B, bands, Q)`` with it."""
        c = self.config
        shift = int(torch.randint(c.bands, (1,), generator=generator))
        if shift == 0:
            return x, y
        angle = -2 * math.pi * shift / c.bands  # band b -> b + shift (clockwise)
        cos, sin = math.cos(angle), math.sin(angle)
        x = x.clone()
        for i, j in ((_X, _Y), (_COS, _SIN)):
            a, b = x[..., i].clone(), x[..., j].clone()
            x[..., i], x[..., j] = a * cos - b * sin, a * sin + b * cos
        cell = x[..., -1]
        valid = cell >= 0
        band, ring = torch.div(cell, c.rings, rounding_mode="floor"), torch.remainder(cell, c.rings)
        moved = torch.remainder(band + shift, c.bands) * c.rings + ring
        x[..., -1] = torch.where(valid, moved, cell)
        return x, torch.roll(y, shift, dims=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 3 or x.shape[-1] != len(FEATURES) + 1:
            raise ValueError(f"{self.kind}.forward expects (B, P, {len(FEATURES) + 1}), got "
                             f"{tuple(x.shape)}")
        batch = x.shape[0]
        cells = c.bands * c.rings
        h = self.point_mlp(x[..., :len(FEATURES)])  # (B, P, D)
        member = x[..., -1:].unsqueeze(-1) == torch.arange(cells, device=x.device,
                                                           dtype=x.dtype).view(1, 1, cells, 1)
        # (B, P, K, 1): max over the points of each cell; empty cells get a learned token
        pooled = torch.where(member, h.unsqueeze(2), torch.full_like(h[:, :1, None], -1e4))
        pooled = pooled.amax(dim=1)  # (B, K, D)
        counts = member.squeeze(-1).sum(dim=1, keepdim=False).to(x.dtype).unsqueeze(-1)
        occupied = counts > 0
        tokens = torch.where(occupied, pooled, self.empty_token.expand(batch, cells, -1))
        tokens = tokens + self.count_embed(torch.log1p(counts)) + self.cell_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

