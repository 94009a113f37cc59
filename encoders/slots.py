"""Object slots: K learned queries per region that each read one object out of the region.

The paper's camera tokens are the [CLS] tokens of a ViT's last blocks: one summary of a whole
view per block, which the LLM then has to take apart into objects. Object slots instead give
each region (a camera view, a LiDAR azimuth band) ``K`` tokens, each meant to carry one
object: a small DETR-style decoder (Carion et al., "End-to-End Object Detection with
Transformers", arXiv 2005.12872) whose queries cross-attend to the region's patch tokens.
Pretraining (:mod:`encoders.pretrain`) teaches slot k of a region to name the region's k-th
nearest object — its class, status, distance ring and direction (``encoders.targets.
slot_targets``) — or "nothing": a fixed nearest-first order instead of DETR's bipartite
matching, so that what a slot should say is known without running the network (text
anchoring, :meth:`encoders.base.Encoder.describe_tokens`).
"""

from __future__ import annotations

import torch
from torch import nn


class ObjectSlots(nn.Module):
    """``slots`` queries per region (plus a learned embedding of the region) -> ``layers``
    pre-norm transformer decoder layers over the region's patch tokens -> ``(B*R, K, D)``."""

    def __init__(self, dim: int, num_heads: int, slots: int, regions: int, layers: int,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.regions = regions
        self.queries = nn.Parameter(torch.zeros(slots, dim))
        self.region_embed = nn.Parameter(torch.zeros(regions, dim))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, num_heads, int(dim * mlp_ratio), dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        """``memory``: the patch tokens of every region, ``(B*R, P, D)`` region-major."""
        if memory.shape[0] % self.regions:
            raise ValueError(f"ObjectSlots: {memory.shape[0]} region rows are not a multiple "
                             f"of {self.regions} regions")
        batch = memory.shape[0] // self.regions
        q = self.queries[None] + self.region_embed.repeat(batch, 1)[:, None]  # (B*R, K, D)
        for layer in self.layers:
            q = layer(q, memory)
        return self.norm(q)
