"""Key and value aligners: encoder tokens -> keys/values in the LLM's K/V space.

README, "How the connection works", gives the formulas.
"""

from __future__ import annotations

import torch
from torch import nn

from aligners.config import ConnectionConfig, ModalitySpec


class KVAligner(nn.Module):
    """``Aligner(x) = GELU(x W1 + b1) W2 + b2`` (or one linear layer, for the ablation)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_mult: int = 4, kind: str = "mlp"):
        super().__init__()
        if kind == "mlp":
            hidden = hidden_mult * in_dim
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
            )
        elif kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            raise ValueError(f"unknown aligner kind {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ModalityAligner(nn.Module):
    """The key aligner, value aligner and positional embeddings of one modality.

    The positional embeddings are this modality's slice of ``T_pos``: concatenating the
    modalities' aligned tokens and their slices equals ``[K_1; …; K_M] + T_pos`` for whichever
    set is connected, so modalities can be added and removed without re-learning the others.
    """

    def __init__(self, spec: ModalitySpec, kv_width: int, config: ConnectionConfig):
        super().__init__()
        self.spec = spec
        self.key = KVAligner(
            spec.embed_dim, kv_width, config.aligner_hidden_mult, config.aligner_kind
        )
        self.value = KVAligner(
            spec.embed_dim, kv_width, config.aligner_hidden_mult, config.aligner_kind
        )
        if config.positional_embeddings:
            self.key_pos = nn.Parameter(torch.randn(spec.num_tokens, kv_width) * 0.02)
            self.value_pos = nn.Parameter(torch.randn(spec.num_tokens, kv_width) * 0.02)
        else:
            self.key_pos = self.value_pos = None

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, D)`` encoder tokens -> keys and values ``(B, T, kv_width)``."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.spec.num_tokens, self.spec.embed_dim):
            raise ValueError(
                f"{self.spec.name}: expected tokens (B, {self.spec.num_tokens}, "
                f"{self.spec.embed_dim}), got {tuple(tokens.shape)}"
            )
        keys, values = self.key(tokens), self.value(tokens)
        if self.key_pos is not None:
            keys = keys + self.key_pos
            values = values + self.value_pos
        return keys, values
