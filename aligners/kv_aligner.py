"""Key and value aligners: encoder tokens -> keys/values in the LLM's K/V space (or its
hidden space, which each connected block projects to its own keys/values).

README, "How the connection works", gives the formulas.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from aligners.config import ConnectionConfig, ModalitySpec
from mpnp.llm import LLMGeometry

#: A block's frozen ``(u_k, u_v) -> (keys, values)`` for hidden-space aligners.
Projection = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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

    With ``config.aligner_space == "hidden"`` the aligners output the LLM's hidden width and
    the model turns them into each block's keys and values (:meth:`block_kv`); with
    ``config.block_maps`` a head-wise map per block (identity at initialisation) follows.
    """

    def __init__(self, spec: ModalitySpec, geometry: LLMGeometry, config: ConnectionConfig):
        super().__init__()
        self.spec = spec
        self.geometry = geometry
        self.space = config.aligner_space
        width = geometry.hidden_size if self.space == "hidden" else geometry.kv_width
        self.key = KVAligner(spec.embed_dim, width, config.aligner_hidden_mult, config.aligner_kind)
        self.value = KVAligner(
            spec.embed_dim, width, config.aligner_hidden_mult, config.aligner_kind
        )
        if config.positional_embeddings:
            self.key_pos = nn.Parameter(torch.randn(spec.num_tokens, width) * 0.02)
            self.value_pos = nn.Parameter(torch.randn(spec.num_tokens, width) * 0.02)
        else:
            self.key_pos = self.value_pos = None
        if config.block_maps:
            eye = torch.eye(geometry.head_dim).expand(
                geometry.num_layers, geometry.num_kv_heads, -1, -1)
            self.block_key = nn.Parameter(eye.clone())
            self.block_value = nn.Parameter(eye.clone())
        else:
            self.block_key = self.block_value = None

    @property
    def per_block(self) -> bool:
        """Whether the blocks get different keys/values from the same tokens."""
        return self.space == "hidden" or self.block_key is not None

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, D)`` encoder tokens -> aligned keys and values ``(B, T, width)``: K/V
        width, or the LLM's hidden width for hidden-space aligners."""
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

    def block_kv(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                 project: Projection | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``layer``'s keys and values ``(B, n_kv, T, head_dim)`` from :meth:`forward`'s
        outputs. ``project`` (hidden-space aligners only) is that block's frozen
        ``(u_k, u_v) -> (k_proj(norm(u_k)), v_proj(norm(u_v)))``."""
        if self.space == "hidden":
            if project is None:
                raise ValueError(f"{self.spec.name}: hidden-space aligners need the block's "
                                 "projection")
            keys, values = project(keys, values)
        g = self.geometry
        b, t, _ = keys.shape
        shape = (b, t, g.num_kv_heads, g.head_dim)
        k, v = keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)
        if self.block_key is not None:
            k = torch.einsum("bhtd,hde->bhte", k, self.block_key[layer])
            v = torch.einsum("bhtd,hde->bhte", v, self.block_value[layer])
        return k, v
