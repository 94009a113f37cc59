"""The injected attention equals a hand-written attention over [α K_mm; K_txt] / [α V_mm; V_txt]."""

from __future__ import annotations

import math

import pytest
import torch

from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from mpnp.tiny import tiny_llm


def reference_attention(attn, hidden, cos, sin, k_mm, v_mm, alpha, gate, pad_mask):
    """Textbook GQA attention of one Llama block with a multimodal prefix.

    hidden (B, S, H); k_mm/v_mm (B, n_kv, P, hd); pad_mask (B, S) 1 = real token.
    """
    b, s, _ = hidden.shape
    hd, n_kv = attn.head_dim, attn.config.num_key_value_heads
    n_heads = attn.config.num_attention_heads
    q = attn.q_proj(hidden).view(b, s, n_heads, hd).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, s, n_kv, hd).transpose(1, 2)
    v = attn.v_proj(hidden).view(b, s, n_kv, hd).transpose(1, 2)

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]

    q, k = rope(q), rope(k)  # the prefix gets no rotary embedding
    if gate == "scale":
        k_ext, v_ext = torch.cat([alpha * k_mm, k], 2), torch.cat([alpha * v_mm, v], 2)
    else:
        k_ext, v_ext = torch.cat([k_mm, k], 2), torch.cat([v_mm, v], 2)
    rep = n_heads // n_kv
    k_ext, v_ext = k_ext.repeat_interleave(rep, 1), v_ext.repeat_interleave(rep, 1)
    scores = q @ k_ext.transpose(-1, -2) / math.sqrt(hd)  # (B, heads, S, P + S)
    p = k_mm.shape[2]
    allowed = torch.ones(b, 1, s, p + s, dtype=torch.bool)
    allowed[..., p:] = (
        torch.tril(torch.ones(s, s, dtype=torch.bool)) & pad_mask[:, None, None, :].bool()
    )
    scores = scores.masked_fill(~allowed, float("-inf"))
    if gate == "logit":
        scores[..., :p] += torch.log(alpha)
    weights = torch.softmax(scores, dim=-1)
    out = (weights @ v_ext).transpose(1, 2).reshape(b, s, n_heads * hd)
    return attn.o_proj(out)


@pytest.mark.parametrize("gate", ["scale", "logit"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_injected_attention_matches_reference(gate, attn_impl):
    llm, tok = tiny_llm("llama", num_layers=3, attn_implementation=attn_impl)
    model = MPnPModel(llm, tok)
    model.create_state(
        "s",
        [ModalitySpec("camera", 8, 3), ModalitySpec("lidar", 5, 2)],
        ConnectionConfig(num_blocks=2, gate=gate),
    )
    torch.manual_seed(1)
    tokens = {"camera": torch.randn(2, 3, 8), "lidar": torch.randn(2, 2, 5)}
    kv = model.multimodal_kv(tokens)
    layer = 2
    attn = model.llm.model.layers[layer].self_attn
    hidden = torch.randn(2, 6, llm.config.hidden_size)
    pad = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    cos, sin = model.llm.model.rotary_emb(hidden, pos)
    mask4d = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None] & pad[:, None, None].bool()
    if attn_impl == "eager":
        mask4d = torch.zeros(mask4d.shape).masked_fill(~mask4d, torch.finfo(torch.float32).min)
    with torch.no_grad(), model.prefix(kv):
        out, _ = attn(hidden, position_embeddings=(cos, sin), attention_mask=mask4d)
    alpha = model.state.connections.alpha(layer)
    with torch.no_grad():
        ref = reference_attention(attn, hidden, cos, sin, *kv.block(layer), alpha, gate, pad)
    # Rows of padding queries attend only to the prefix in ours; compare real tokens only.
    real = pad.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_causal_mask_is_built_when_the_stock_path_would_use_is_causal():
    llm, tok = tiny_llm("llama", num_layers=2)
    model = MPnPModel(llm, tok)
    model.create_state("s", [ModalitySpec("camera", 8, 3)], ConnectionConfig(num_blocks=1))
    kv = model.multimodal_kv({"camera": torch.randn(1, 3, 8)})
    attn = model.llm.model.layers[1].self_attn
    hidden = torch.randn(1, 5, llm.config.hidden_size)
    pos = torch.arange(5)[None]
    cos, sin = model.llm.model.rotary_emb(hidden, pos)
    with torch.no_grad(), model.prefix(kv):
        out, _ = attn(hidden, position_embeddings=(cos, sin), attention_mask=None)
        alpha = model.state.connections.alpha(1)
        ref = reference_attention(
            attn, hidden, cos, sin, *kv.block(1), alpha, "scale", torch.ones(1, 5)
        )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
