"""The analytic FLOPs model of one training step (mPnP-LLM, arXiv 2312.07886).

``T_step(N) = T_fwd + T_dw(aligners) + T_dy(emb) + (N / L) · T_dy(LLM)``

The forward always runs the whole LLM; backward reaches only the last N blocks, which is
where mPnP saves. Terms are counted from the model's real layer shapes (every ``nn.Linear``
of a block, the attention score/value products, the output embedding), so the same model
serves Llama, Qwen2 and OPT. A matmul ``(m × k) · (k × n)`` costs ``2·m·k·n`` FLOPs; its
backward costs the same again for the input gradient (``T_dy``) and for the weight
gradient (``T_dw``).

This is the project's one cost model: the CLI's planner, the daemon's budget planner
(:mod:`policies.budget`) and the benchmarks all read :class:`CostModel`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from aligners.config import ConnectionConfig, ModalitySpec

if TYPE_CHECKING:  # importable without torch: the daemon's planner reads CostModel only
    from torch import nn


def _linear_weights(module: nn.Module) -> int:
    """Sum of ``in × out`` over a block's own linear layers (LoRA adapters excluded)."""
    from torch import nn

    return sum(
        m.in_features * m.out_features
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and "lora_" not in name
    )


def _blocks(llm: nn.Module) -> list[nn.Module]:
    """Decoder blocks: the parents of the attention modules."""
    from mpnp.llm import attention_modules

    attn = {id(a) for a in attention_modules(llm)}
    blocks = [m for m in llm.modules() if any(id(c) in attn for c in m.children())]
    return blocks


@dataclass(frozen=True)
class CostModel:
    """Analytic FLOPs of one training step of ``batch`` samples, by term.

    The one cost model: :func:`analytic_step_cost` fills it from the LLM's real shapes, the
    budget planner (:class:`policies.budget.BudgetPlanner`) solves N and the number of
    steps from it, and the benchmarks compare it with measured counts.
    """

    forward: float  # forward of the whole LLM (plus the aligners)
    dy_llm: float  # activation gradients through all L blocks
    dy_emb: float  # activation gradient through the output embedding
    dw_aligners: float  # aligner (and LoRA) weight and inner-activation gradients
    num_layers: int
    dw_llm: float = 0.0  # weight gradients of all L blocks (full fine-tuning only)
    dw_emb: float = 0.0  # weight gradient of the output embedding (full fine-tuning only)
    batch: int = 1  # samples the terms are counted for

    def __post_init__(self) -> None:
        for name in ("forward", "dy_llm", "dy_emb", "dw_aligners", "dw_llm", "dw_emb"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {value}")
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"CostModel.num_layers must be an int >= 1, got {self.num_layers}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"CostModel.batch must be an int >= 1, got {self.batch}")

    def mpnp(self, n_blocks: int) -> float:
        """``T_fwd + T_dw(aligners) + T_dy(emb) + (N / L) · T_dy(LLM)`` for the whole batch."""
        self._check_n(n_blocks)
        return (
            self.forward + self.dw_aligners + self.dy_emb + n_blocks / self.num_layers * self.dy_llm
        )

    def full_finetune(self) -> float:
        return self.forward + self.dy_llm + self.dw_llm + self.dy_emb + self.dw_emb

    def backward_flops(self, n_blocks: int) -> float:
        """``T_backprop(N)`` for one sample."""
        return (self.mpnp(n_blocks) - self.forward) / self.batch

    def sample_flops(self, n_blocks: int) -> float:
        """Forward (whole LLM) + backward(N) for one training sample."""
        return self.mpnp(n_blocks) / self.batch

    def step_flops(self, n_blocks: int, batch: int) -> float:
        """FLOPs of one optimizer step over ``batch`` samples."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return batch * self.sample_flops(n_blocks)

    def to_dict(self) -> dict:
        return asdict(self)

    def _check_n(self, n_blocks: int) -> None:
        if not 0 <= n_blocks <= self.num_layers:
            raise ValueError(f"n_blocks must be in 0..{self.num_layers}, got {n_blocks}")


def analytic_step_cost(
    llm: nn.Module,
    *,
    batch: int,
    text_tokens: int,
    prefix_tokens: int = 0,
    aligner_flops_per_token: float = 0.0,
    n_blocks_for_prefix: int | None = None,
) -> CostModel:
    """Analytic step cost for ``batch`` sequences of ``text_tokens`` tokens.

    Args:
        llm: the LLM (its real layer shapes are counted).
        batch: sequences per step.
        text_tokens: tokens per sequence (prompt + answer).
        prefix_tokens: multimodal tokens seen by connected blocks (attention cost only).
        aligner_flops_per_token: forward FLOPs of the aligners per modality token.
        n_blocks_for_prefix: how many blocks attend to the prefix (default: all).
    """
    from mpnp.llm import llm_geometry

    geom = llm_geometry(llm)
    blocks = _blocks(llm)
    cfg = llm.config
    heads = cfg.num_attention_heads
    s = text_tokens
    n_pre = geom.num_layers if n_blocks_for_prefix is None else n_blocks_for_prefix
    # Causal attention: query i sees i + 1 text keys -> s(s+1)/2 pairs; QK^T and AV each
    # cost 2·head_dim FLOPs per (query, key) pair and head.
    attn_text = 2 * 2 * heads * geom.head_dim * s * (s + 1) / 2
    attn_prefix = 2 * 2 * heads * geom.head_dim * s * prefix_tokens
    linear = sum(2 * s * _linear_weights(b) for b in blocks)
    attention = geom.num_layers * attn_text + n_pre * attn_prefix
    out_emb = llm.get_output_embeddings()
    emb = 2 * s * out_emb.in_features * out_emb.out_features
    forward = batch * (linear + attention + emb)
    aligners_fwd = batch * prefix_tokens * aligner_flops_per_token
    return CostModel(
        forward=forward + aligners_fwd,
        dy_llm=batch * (linear + 2 * attention),  # attention backward: dQ and dK, dP and dV
        dw_llm=batch * linear,
        dy_emb=batch * emb,
        dw_emb=batch * emb,
        dw_aligners=2 * aligners_fwd,
        num_layers=geom.num_layers,
        batch=batch,
    )


def aligner_flops_per_token(embed_dim: int, kv_width: int, hidden_mult: int = 4, *,
                            hidden_size: int | None = None, num_layers: int = 0,
                            head_dim: int = 0) -> float:
    """Forward FLOPs of one modality's key + value MLP aligners for one token.

    With ``hidden_size`` (hidden-space aligners, ``ConnectionConfig.aligner_space ==
    "hidden"``) the MLPs output the LLM's width and each of ``num_layers`` blocks projects
    the token to its keys and values; ``head_dim`` > 0 adds the per-block maps. Counted for
    every block, an upper bound that does not depend on N (these are a few percent of a
    step)."""
    hidden = hidden_mult * embed_dim
    out = kv_width if hidden_size is None else hidden_size
    flops = 2 * 2 * (embed_dim * hidden + hidden * out)
    if hidden_size is not None:
        flops += num_layers * 2 * 2 * hidden_size * kv_width
    if head_dim:
        flops += num_layers * 2 * 2 * kv_width * head_dim
    return flops


def adaptation_cost(llm: nn.Module, modalities: Sequence[ModalitySpec], text_tokens: int,
                    batch: int = 1, connection: ConnectionConfig | None = None) -> CostModel:
    """The cost model of adapting ``modalities`` (their tokens and aligners) into ``llm``
    with ``batch`` sequences of ``text_tokens`` tokens per step (``connection``: the state's
    aligner recipe, default the paper's)."""
    from mpnp.llm import llm_geometry

    geom = llm_geometry(llm)
    recipe = {}
    if connection is not None and connection.aligner_space == "hidden":
        recipe.update(hidden_size=geom.hidden_size, num_layers=geom.num_layers)
    if connection is not None and connection.block_maps:
        recipe.update(num_layers=geom.num_layers, head_dim=geom.head_dim)
    hidden_mult = connection.aligner_hidden_mult if connection is not None else 4
    prefix = sum(m.num_tokens for m in modalities)
    per_token = sum(m.num_tokens * aligner_flops_per_token(m.embed_dim, geom.kv_width,
                                                            hidden_mult, **recipe)
                    for m in modalities) / max(prefix, 1)
    return analytic_step_cost(llm, batch=batch, text_tokens=text_tokens, prefix_tokens=prefix,
                              aligner_flops_per_token=per_token)
