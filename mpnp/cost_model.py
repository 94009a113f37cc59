"""The analytic FLOPs model of one training step (mPnP-LLM, arXiv 2312.07886).

``T_step(N) = T_fwd + T_dw(aligners) + T_dy(emb) + (N / L) · T_dy(LLM)``

The forward always runs the whole LLM; backward reaches only the last N blocks, which is
where mPnP saves. Terms are counted from the model's real layer shapes (every ``nn.Linear``
of a block, the attention score/value products, the output embedding), so the same model
serves Llama, Qwen2 and OPT. A matmul ``(m × k) · (k × n)`` costs ``2·m·k·n`` FLOPs; its
backward costs the same again for the input gradient (``T_dy``) and for the weight
gradient (``T_dw``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from mpnp.llm import attention_modules, llm_geometry


def _linear_weights(module: nn.Module) -> int:
    """Sum of ``in × out`` over a block's own linear layers (LoRA adapters excluded)."""
    return sum(
        m.in_features * m.out_features
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and "lora_" not in name
    )


def _blocks(llm: nn.Module) -> list[nn.Module]:
    """Decoder blocks: the parents of the attention modules."""
    attn = {id(a) for a in attention_modules(llm)}
    blocks = [m for m in llm.modules() if any(id(c) in attn for c in m.children())]
    return blocks


@dataclass(frozen=True)
class StepCost:
    """Analytic FLOPs of one training step, by term (all per batch)."""

    forward: float
    dy_llm: float  # activation gradients through all L blocks
    dw_llm: float  # weight gradients of all L blocks (full fine-tuning only)
    dy_emb: float  # activation gradient through the output embedding
    dw_emb: float  # weight gradient of the output embedding (full fine-tuning only)
    dw_aligners: float  # aligner (and LoRA) weight and inner-activation gradients
    num_layers: int

    def mpnp(self, n_blocks: int) -> float:
        """``T_fwd + T_dw(aligners) + T_dy(emb) + (N / L) · T_dy(LLM)``."""
        return (
            self.forward + self.dw_aligners + self.dy_emb + n_blocks / self.num_layers * self.dy_llm
        )

    def full_finetune(self) -> float:
        return self.forward + self.dy_llm + self.dw_llm + self.dy_emb + self.dw_emb

    def to_dict(self) -> dict:
        return asdict(self)


def analytic_step_cost(
    llm: nn.Module,
    *,
    batch: int,
    text_tokens: int,
    prefix_tokens: int = 0,
    aligner_flops_per_token: float = 0.0,
    n_blocks_for_prefix: int | None = None,
) -> StepCost:
    """Analytic step cost for ``batch`` sequences of ``text_tokens`` tokens.

    Args:
        llm: the LLM (its real layer shapes are counted).
        batch: sequences per step.
        text_tokens: tokens per sequence (prompt + answer).
        prefix_tokens: multimodal tokens seen by connected blocks (attention cost only).
        aligner_flops_per_token: forward FLOPs of the aligners per modality token.
        n_blocks_for_prefix: how many blocks attend to the prefix (default: all).
    """
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
    return StepCost(
        forward=forward + aligners_fwd,
        dy_llm=batch * (linear + 2 * attention),  # attention backward: dQ and dK, dP and dV
        dw_llm=batch * linear,
        dy_emb=batch * emb,
        dw_emb=batch * emb,
        dw_aligners=2 * aligners_fwd,
        num_layers=geom.num_layers,
    )


def aligner_flops_per_token(embed_dim: int, kv_width: int, hidden_mult: int = 4) -> float:
    """Forward FLOPs of one modality's key + value MLP aligners for one token."""
    hidden = hidden_mult * embed_dim
    return 2 * 2 * (embed_dim * hidden + hidden * kv_width)


def solve_num_blocks(cost: StepCost, budget_flops: float) -> int:
    """The largest N whose step fits ``budget_flops`` (0 if even N = 0 does not fit:
    the official code has this helper but never calls it; the planner does)."""
    best = 0
    for n in range(cost.num_layers + 1):
        if cost.mpnp(n) <= budget_flops:
            best = n
    return best
