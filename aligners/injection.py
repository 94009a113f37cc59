"""The narrow hook through which multimodal keys/values enter the LLM's attention.

No model class is forked. transformers routes every attention call of Llama-, Qwen2-,
Mistral- and OPT-style models through a registered *attention function*; we register two
wrappers, ``mpnp_sdpa`` and ``mpnp_eager``, around the stock ``sdpa`` and ``eager``
functions and switch the resident LLM to one of them. The wrapper asks the model's
:class:`KVInjector` whether the calling block is connected:

- not connected (every block when no modality is connected, and blocks below ``L − N``):
  the stock function is called with *the very same arguments* — the base LLM, bit for bit;
- connected block ``j``: keys become ``[α_j·K_mm ; K_txt]`` and values ``[α_j·V_mm ; V_txt]``.

The multimodal keys are appended *after* the block has applied rotary embeddings to the text
keys and updated its cache, so they carry no rotary embedding, never enter the KV cache (the
prefix is computed once per query and re-attached at every decoding step), and text positions
start at 0 exactly as without a prefix. Every text query may attend to every multimodal
token; padding masks of the text part are kept as they are.

For diagnostics the injector can also *isolate* a span of text positions in chosen blocks
(:meth:`KVInjector.isolating`): there, positions outside the span may not attend to it. With
the scene written as words and isolated below the connected blocks, the question sees the
scene in exactly the blocks where mPnP's tokens would be (``mpnp bench grounding``'s
``oracle-text-connected`` row).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

#: Our attention implementations and the stock ones they wrap.
WRAPPED_IMPLEMENTATIONS = {"mpnp_sdpa": "sdpa", "mpnp_eager": "eager"}


@dataclass
class BlockPrefix:
    """The extra keys/values one connected block attends to.

    Attributes:
        key: ``(B, n_kv_heads, P, head_dim)`` multimodal keys, already gated.
        value: ``(B, n_kv_heads, P, head_dim)`` multimodal values, already gated.
        logit_bias: for the ``logit`` gate, ``log α_j`` added to the multimodal attention
            logits (a 0-d tensor); ``None`` for the paper's ``scale`` gate.
    """

    key: torch.Tensor
    value: torch.Tensor
    logit_bias: torch.Tensor | None = None


PrefixProvider = Callable[[int], "BlockPrefix | None"]
#: ``layer_idx -> (B, S)`` bool mask of the text positions isolated in that block, or ``None``.
IsolationProvider = Callable[[int], "torch.Tensor | None"]


class KVInjector:
    """Holds, for the duration of one forward, which blocks get which prefix.

    One injector is attached to every attention module of a resident LLM (as a plain
    attribute, not a submodule). Outside :meth:`active` it provides nothing, so the LLM is
    the base LLM.
    """

    def __init__(self) -> None:
        self._provider: PrefixProvider | None = None
        self._isolation: IsolationProvider | None = None

    def prefix_for(self, layer_idx: int) -> BlockPrefix | None:
        return None if self._provider is None else self._provider(layer_idx)

    def isolated_for(self, layer_idx: int) -> torch.Tensor | None:
        return None if self._isolation is None else self._isolation(layer_idx)

    @contextmanager
    def isolating(self, provider: IsolationProvider) -> Iterator[None]:
        """Meanwhile, in each block where ``provider`` gives a ``(B, S)`` mask, text
        positions outside the mask may not attend to positions inside it (those still
        attend to each other and to what precedes them). Diagnostic only."""
        if self._isolation is not None:
            raise RuntimeError("a text isolation is already active on this LLM")
        self._isolation = provider
        try:
            yield
        finally:
            self._isolation = None

    @contextmanager
    def active(self, provider: PrefixProvider) -> Iterator[None]:
        if self._provider is not None:
            raise RuntimeError("a multimodal prefix is already active on this LLM")
        self._provider = provider
        try:
            yield
        finally:
            self._provider = None


def _base_function(module: nn.Module, base_name: str) -> Callable:
    if base_name == "eager":
        # Each modeling file has its own eager function (OPT's differs from Llama's).
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base_name]


def _text_mask(
    mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor | None:
    """The text part of the mask as ``(B|1, 1, Q, K)``, made explicit where the stock
    function would have used ``is_causal`` (it cannot once the key axis grows)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is not None:
        return mask[..., :k_len]
    if q_len == 1:
        return None
    # Queries are the last q_len positions of the k_len text positions.
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
    return (torch.arange(k_len, device=query.device)[None, :] <= q_pos)[None, None]


def extend_mask(
    mask: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    num_prefix: int,
    logit_bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """Prepend ``num_prefix`` always-visible columns to the text attention mask.

    Boolean masks stay boolean (``True`` = attend) unless a logit bias is needed; additive
    float masks get ``0`` (or the bias) in the new columns.
    """
    text = _text_mask(mask, query, key)
    batch, q_len = query.shape[0], query.shape[2]
    if text is None and logit_bias is None:
        return None
    if text is None:
        text = torch.zeros(1, 1, q_len, key.shape[2], dtype=query.dtype, device=query.device)
    if text.dtype == torch.bool and logit_bias is None:
        prefix = torch.ones(1, 1, 1, num_prefix, dtype=torch.bool, device=text.device)
    else:
        if text.dtype == torch.bool:
            text = torch.zeros_like(text, dtype=query.dtype).masked_fill(
                ~text, torch.finfo(query.dtype).min
            )
        fill = 0.0 if logit_bias is None else logit_bias.to(text.dtype)
        prefix = torch.zeros(1, 1, 1, num_prefix, dtype=text.dtype, device=text.device) + fill
    shape = (max(batch, text.shape[0]), text.shape[1], text.shape[2], num_prefix)
    return torch.cat([prefix.expand(shape), text.expand(shape[:3] + (text.shape[3],))], dim=-1)


def isolate_mask(
    mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, isolated: torch.Tensor
) -> torch.Tensor:
    """The text mask with columns of ``isolated`` ``(B, S ≥ K)`` positions closed to queries
    outside them; the queries are the last ``Q`` of the ``K`` key positions."""
    q_len, k_len = query.shape[2], key.shape[2]
    text = _text_mask(mask, query, key)
    if text is None:  # one decoding step, no padding: every key was visible (additive
        # zeros suit both the sdpa and the eager functions)
        text = torch.zeros(1, 1, q_len, k_len, dtype=query.dtype, device=query.device)
    inside = isolated[:, :k_len].to(query.device)
    closed = inside[:, None, None, :] & ~inside[:, None, k_len - q_len:, None]
    if text.dtype == torch.bool:
        return text & ~closed
    return text.masked_fill(closed, torch.finfo(text.dtype).min)


def _make_attention(impl: str) -> Callable:
    base_name = WRAPPED_IMPLEMENTATIONS[impl]

    def mpnp_attention(module, query, key, value, attention_mask, **kwargs):
        base = _base_function(module, base_name)
        injector: KVInjector | None = getattr(module, "mpnp_injector", None)
        prefix = injector.prefix_for(module.layer_idx) if injector is not None else None
        isolated = injector.isolated_for(module.layer_idx) if injector is not None else None
        if isolated is not None:
            attention_mask = isolate_mask(attention_mask, query, key, isolated)
            kwargs.pop("is_causal", None)
        if prefix is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        if prefix.key.shape[0] != key.shape[0] and prefix.key.shape[0] != 1:
            raise ValueError(
                f"multimodal prefix batch {prefix.key.shape[0]} != text batch {key.shape[0]}"
            )
        pk = prefix.key.to(key.dtype).expand(key.shape[0], -1, -1, -1)
        pv = prefix.value.to(value.dtype).expand(value.shape[0], -1, -1, -1)
        mask = extend_mask(attention_mask, query, key, pk.shape[2], prefix.logit_bias)
        key = torch.cat([pk, key], dim=2)  # (B, n_kv, P + K, hd)
        value = torch.cat([pv, value], dim=2)  # (B, n_kv, P + K, hd)
        kwargs.pop("is_causal", None)
        return base(module, query, key, value, mask, **kwargs)

    mpnp_attention.__name__ = f"{impl}_attention"
    return mpnp_attention


def register_implementations() -> None:
    """Register the wrapped attention (and mask) functions with transformers (idempotent)."""
    for impl, base in WRAPPED_IMPLEMENTATIONS.items():
        if impl not in AttentionInterface._global_mapping:
            AttentionInterface.register(impl, _make_attention(impl))
        if impl not in AttentionMaskInterface._global_mapping:
            AttentionMaskInterface.register(impl, ALL_MASK_ATTENTION_FUNCTIONS[base])


def attach_injector(llm: nn.Module, attention: list[nn.Module]) -> KVInjector:
    """Switch ``llm`` to the wrapped attention and give every block one shared injector.

    The stock implementation in use (``sdpa`` or ``eager``) is kept underneath; anything else
    (flash, flex) is refused because its masks cannot take extra key columns.
    """
    register_implementations()
    current = llm.config._attn_implementation
    if current in WRAPPED_IMPLEMENTATIONS:
        impl = current
    elif current in ("sdpa", "eager"):
        impl = f"mpnp_{current}"
    else:
        raise ValueError(
            f"attention implementation {current!r} is not supported; load the LLM with "
            "attn_implementation='sdpa' or 'eager'"
        )
    llm.set_attn_implementation(impl)
    injector = KVInjector()
    for module in attention:
        # object.__setattr__: a plain reference, not a registered submodule.
        object.__setattr__(module, "mpnp_injector", injector)
    return injector
