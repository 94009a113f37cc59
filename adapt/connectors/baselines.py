"""The comparison rows of Table 1 (the mPnP-LLM paper's baselines; README: Table 1), behind
the connector interface.

All of them put something at the LLM's *input*, so every step back-propagates through the
whole LLM — the cost mPnP avoids:

- :class:`FullLLMConnector` — encoder tokens projected into the input sequence; the
  projection and the whole LLM train (on a private copy, so the resident LLM is untouched).
- :class:`PromptFuseConnector` — trainable soft prompts plus encoder tokens projected to the
  LLM width; only prompts and projection train (the projection is needed because encoder
  and LLM widths differ; the paper's PromptFuse assumes a frozen shared width).
- :class:`QuestionOnlyConnector` — PromptFuse with no sensor at all: what the questions
  alone allow, the floor every sensor method must clear.
- :class:`EPALMConnector` — eP-ALM: one shared linear maps encoder summary tokens into the
  hidden states of the upper ~40 % of blocks (each token serves two consecutive blocks; the
  first injection fills a reserved slot, later ones overwrite it) plus 10 soft prompts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers import DynamicCache

from adapt.connectors import register_connector
from adapt.connectors.base import Connector, ConnectorConfig, answer_loss
from adapt.features import Batch
from aligners.config import ModalitySpec
from mpnp.answers import normalize_answer
from mpnp.generation import (
    PromptBatch,
    decode_until_stop,
    encode_prompts,
    position_ids_from_mask,
    stop_token_ids,
)
from mpnp.llm import decoder_layers


class InputPrefixConnector(Connector):
    """Base of connectors that prepend embeddings ``(B, P, H)`` to the text."""

    def __init__(self, llm, tokenizer, modalities: Sequence[ModalitySpec],
                 config: ConnectorConfig, *, num_prompts: int | None = None):
        super().__init__(llm, tokenizer, modalities, config)
        self.llm = llm
        hidden = llm.config.hidden_size
        n_prompts = config.num_prompts if num_prompts is None else num_prompts
        self.prompts = nn.Parameter(torch.randn(n_prompts, hidden) * 0.02) if n_prompts else None
        self.projection = nn.ModuleDict(
            {m.name: nn.Linear(m.embed_dim, hidden) for m in modalities}
        )
        self.to(llm.get_input_embeddings().weight.device)

    def fork(self, name: str) -> InputPrefixConnector:
        llm = self._modules.pop("llm")  # share the frozen LLM, copy the rest
        try:
            twin = copy.deepcopy(self)
        finally:
            self._modules["llm"] = llm
        twin._modules["llm"] = llm
        return twin

    def set_modalities(self, modalities: Sequence[ModalitySpec]) -> None:
        hidden = self.llm.config.hidden_size
        kept = {m.name: self.projection[m.name] for m in modalities if m.name in self.projection}
        self.projection = nn.ModuleDict(
            {m.name: kept.get(m.name) or nn.Linear(m.embed_dim, hidden).to(self.device())
             for m in modalities}
        )
        self.modalities = list(modalities)

    # What goes in front of the text; subclasses extend it.
    def prefix(self, tokens: Mapping[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        dev = self.device()
        parts = []
        if self.prompts is not None:
            parts.append(self.prompts.expand(batch_size, -1, -1))
        for m in self.modality_names:
            parts.append(self.projection[m](tokens[m].to(dev)))
        if not parts:
            return torch.zeros(batch_size, 0, self.llm.config.hidden_size, device=dev)
        return torch.cat(parts, dim=1)  # (B, P, H)

    def injection(self, tokens: Mapping[str, torch.Tensor]):
        """Context manager active around every LLM call (eP-ALM's hidden-state hooks)."""
        return nullcontext()

    def _inputs(self, prefix: torch.Tensor, pb: PromptBatch):
        embeds = self.llm.get_input_embeddings()(pb.input_ids)
        ones = torch.ones(prefix.shape[:2], dtype=pb.attention_mask.dtype, device=prefix.device)
        mask = torch.cat([ones, pb.attention_mask], dim=1)
        return torch.cat([prefix.to(embeds.dtype), embeds], dim=1), mask

    def loss(self, batch: Batch) -> torch.Tensor:
        pb = self.training_batch(batch)
        prefix = self.prefix(batch.tokens, len(batch))
        embeds, mask = self._inputs(prefix, pb)
        no_loss = torch.full(prefix.shape[:2], -100, dtype=torch.long, device=pb.labels.device)
        padded = PromptBatch(pb.input_ids, mask, position_ids_from_mask(mask),
                             torch.cat([no_loss, pb.labels], 1))
        with self.injection(batch.tokens):
            return answer_loss(
                lambda **kw: self.llm(inputs_embeds=embeds, attention_mask=mask,
                                      position_ids=padded.position_ids, **kw),
                padded, self.config.answer_logits_only,
            )

    @torch.no_grad()
    def answer(self, questions: Sequence[str], tokens: Mapping[str, torch.Tensor]) -> list[str]:
        was = self.training
        self.eval()
        try:
            ids = self._greedy(questions, tokens)
        finally:
            self.train(was)
        return [normalize_answer(t) for t in decode_until_stop(self.tokenizer, ids)]

    def _greedy(self, questions, tokens) -> torch.Tensor:
        pb = encode_prompts(self.tokenizer, questions).to(self.device())
        prefix = self.prefix(tokens, len(questions))
        embeds, mask = self._inputs(prefix, pb)
        pos = position_ids_from_mask(mask)
        cache = DynamicCache()
        stops = torch.tensor(sorted(stop_token_ids(self.tokenizer)), device=mask.device)
        done = torch.zeros(len(questions), dtype=torch.bool, device=mask.device)
        generated = []
        with self.injection(tokens):
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                           cache=cache, use_cache=True, logits_to_keep=1)
            for step in range(self.config.max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.tokenizer.pad_token_id), nxt)
                generated.append(nxt)
                done |= torch.isin(nxt, stops)
                if bool(done.all()) or step == self.config.max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                out = self.llm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                               cache=cache, use_cache=True, logits_to_keep=1)
        return torch.stack(generated, dim=1)


@register_connector
class PromptFuseConnector(InputPrefixConnector):
    kind = "promptfuse"

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"projection": list(self.projection.parameters())}
        if self.prompts is not None:
            groups["prompts"] = [self.prompts]
        return {k: v for k, v in groups.items() if v}


@register_connector
class QuestionOnlyConnector(PromptFuseConnector):
    """Soft prompts trained on the questions alone: no sensor reaches the LLM."""

    kind = "question_only"

    def __init__(self, llm, tokenizer, modalities, config, **kwargs):
        super().__init__(llm, tokenizer, [], config, **kwargs)

    def set_modalities(self, modalities: Sequence[ModalitySpec]) -> None:
        """No sensor ever reaches this model."""


@register_connector
class FullLLMConnector(InputPrefixConnector):
    """Projection into the input sequence and the whole LLM fine-tuned (on a private copy)."""

    kind = "full_llm"

    def __init__(self, llm, tokenizer, modalities, config, **kwargs):
        super().__init__(copy.deepcopy(llm), tokenizer, modalities, config, num_prompts=0)

    def fork(self, name: str) -> FullLLMConnector:
        return copy.deepcopy(self)  # the fine-tuned LLM is part of what was trained

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        llm_params = [p for n, p in self.llm.named_parameters() if "lora_" not in n]
        return {"projection": list(self.projection.parameters()), "llm": llm_params}


@register_connector
class EPALMConnector(InputPrefixConnector):
    """eP-ALM: encoder summary tokens injected into the upper blocks' hidden states."""

    kind = "epalm"
    #: Share of the (upper) blocks that receive an injected token.
    UPPER_FRACTION = 0.4
    #: Consecutive blocks served by one token.
    BLOCKS_PER_TOKEN = 2

    def __init__(self, llm, tokenizer, modalities, config, **kwargs):
        super().__init__(llm, tokenizer, modalities, config, num_prompts=10)
        num_layers = len(decoder_layers(llm))
        n_inject = max(1, round(self.UPPER_FRACTION * num_layers))
        self.inject_layers = list(range(num_layers - n_inject, num_layers))
        self.num_tokens = math.ceil(n_inject / self.BLOCKS_PER_TOKEN)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"projection": list(self.projection.parameters()), "prompts": [self.prompts]}

    def prefix(self, tokens, batch_size):
        # [reserved slot][10 soft prompts]; encoder tokens enter through the hooks instead.
        # The slot's input is a real token embedding (an all-zero input row makes the
        # RMSNorm backward produce NaN); the hooks overwrite it from the first upper block.
        tok = self.tokenizer
        slot_id = next(i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, 0)
                       if i is not None)
        slot = self.llm.get_input_embeddings().weight[slot_id].detach()
        slot = slot.expand(batch_size, 1, -1)
        return torch.cat([slot, self.prompts.expand(batch_size, -1, -1)], dim=1)

    def summary_tokens(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Encoder tokens -> ``num_tokens`` injected vectors ``(B, K, H)``.

        eP-ALM takes the [CLS] of the last encoder blocks; our encoders already hand over
        per-level/per-band tokens, so they are projected (the shared linear) and averaged
        in ``num_tokens`` contiguous groups, in order.
        """
        dev = self.device()
        projected = torch.cat(
            [self.projection[m](tokens[m].to(dev)) for m in self.modality_names], dim=1
        )
        groups = torch.tensor_split(projected, self.num_tokens, dim=1)
        return torch.stack([g.mean(dim=1) for g in groups], dim=1)

    @contextmanager
    def injection(self, tokens) -> Iterator[None]:
        if not self.modality_names:
            yield
            return
        injected = self.summary_tokens(tokens)
        layers = decoder_layers(self.llm)
        handles = []
        for k, layer_idx in enumerate(self.inject_layers):
            vec = injected[:, k // self.BLOCKS_PER_TOKEN]

            def hook(module, args, kwargs, vec=vec):
                hidden = args[0] if args else kwargs["hidden_states"]
                if hidden.shape[1] == 1:  # a decoding step: the slot is in the cache already
                    return None
                hidden = torch.cat([vec[:, None].to(hidden.dtype), hidden[:, 1:]], dim=1)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, kwargs | {"hidden_states": hidden}

            handles.append(layers[layer_idx].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
