"""mPnP as a connector, with the frozen lower blocks computed once per training sample.

The hidden states entering block ``L − N`` depend on the text only — not on the sensor
inputs, nor on any trainable parameter (aligners, connections and LoRA all live in the last
N blocks). So they are computed once per distinct training prompt and *replayed* in later
epochs: the lower blocks are swapped for pass-through modules for the duration of the
forward, and block ``L − N`` receives the cached states. Per step this removes
``(L − N) / L`` of the forward pass on top of the backward savings the method already has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from adapt.connectors import register_connector
from adapt.connectors.base import Connector, ConnectorConfig, answer_loss
from adapt.features import Batch
from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from mpnp.generation import PromptBatch, final_answers, generate_answers
from mpnp.llm import decoder_layers


class _Skip(nn.Module):
    """Stands in for a frozen lower block: returns its input (or the replayed states)."""

    def __init__(self, replay: torch.Tensor | None = None):
        super().__init__()
        self.replay = replay

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if self.replay is None else self.replay


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


@contextmanager
def replay_lower_blocks(llm: nn.Module, hidden: torch.Tensor, first: int) -> Iterator[None]:
    """Run ``llm`` with blocks ``< first`` replaced by ``hidden`` (the input of block ``first``)."""
    layers = decoder_layers(llm)
    saved = [layers[i] for i in range(first)]
    try:
        for i in range(first):
            layers[i] = _Skip(hidden if i == 0 else None)
        yield
    finally:
        for i, block in enumerate(saved):
            layers[i] = block


@torch.no_grad()
def lower_hidden_states(llm: nn.Module, batch: PromptBatch, first: int) -> torch.Tensor:
    """The hidden states entering block ``first`` ``(B, S, H)``; the rest is not computed."""
    layers = decoder_layers(llm)

    def stop(module, args, output):
        raise _Captured(output if torch.is_tensor(output) else output[0])

    handle = layers[first - 1].register_forward_hook(stop)
    try:
        llm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=batch.position_ids, use_cache=False)
    except _Captured as captured:
        return captured.hidden
    finally:
        handle.remove()
    raise RuntimeError("block forward hook did not fire")


@register_connector
class MPnPConnector(Connector):
    """Aligners + latent connections + LoRA on K/V of the last N blocks.

    README, "How the connection works", describes the connection.
    """

    kind = "mpnp"

    def __init__(self, llm, tokenizer, modalities: Sequence[ModalitySpec],
                 config: ConnectorConfig, *, model: MPnPModel | None = None,
                 state_name: str = "adapt", connection: ConnectionConfig | None = None,
                 cache_hidden: bool = True):
        super().__init__(llm, tokenizer, modalities, config)
        self.model = model if model is not None else MPnPModel(llm, tokenizer)
        if state_name in self.model.states:
            self.model.activate(state_name)
        else:
            connection = connection or ConnectionConfig(num_blocks=config.num_blocks)
            self.model.create_state(state_name, modalities, connection)
        self.state_name = state_name
        self.cache_hidden = cache_hidden
        self._hidden: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self.hidden_cache_hits = 0
        self.hidden_cache_misses = 0

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        self.model.activate(self.state_name)
        return {g: list(ps.values()) for g, ps in self.model.parameter_groups().items() if ps}

    def _tokens(self, tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.device()
        return {m: tokens[m].to(dev) for m in self.model.state.connected}

    @staticmethod
    def _hidden_keys(pb: PromptBatch, first: int) -> list[tuple[int, tuple[int, ...]]]:
        """Replay-cache keys of the batch's rows: the entry block and the unpadded ids."""
        return [(first, tuple(ids[m.bool()].tolist()))
                for ids, m in zip(pb.input_ids, pb.attention_mask)]

    def _cached_lower(self, pb: PromptBatch, first: int) -> torch.Tensor:
        """Input of block ``first`` for the batch, from the cache where possible."""
        keys = self._hidden_keys(pb, first)
        missing = [i for i, k in enumerate(keys) if k not in self._hidden]
        self.hidden_cache_hits += len(keys) - len(missing)
        self.hidden_cache_misses += len(missing)
        if missing:
            hidden = lower_hidden_states(self.model.llm, pb, first)
            for i in missing:
                self._hidden[keys[i]] = hidden[i, pb.attention_mask[i].bool()].clone()
        out = torch.zeros(*pb.input_ids.shape, self.model.geometry.hidden_size,
                          device=pb.input_ids.device)
        for i, key in enumerate(keys):
            real = pb.attention_mask[i].bool()
            out[i, real] = self._hidden[key]
        return out

    def step_signature(self, batch: Batch) -> tuple:
        """What a training step's FLOPs on ``batch`` depend on beyond the fixed state:
        the padded prompt shape, the answer tokens per row (logits are computed there
        only) and whether the lower blocks must run (a replay-cache miss runs them for
        the whole batch). Two steps with the same signature cost the same FLOPs, so a
        caller can count one with ``torch.utils.flop_counter`` and reuse the count."""
        self.model.activate(self.state_name)
        pb = self.training_batch(batch)
        answers = tuple(int(n) for n in (pb.labels != -100).sum(dim=1))
        first = self.model.geometry.num_layers - self.model.state.config.num_blocks
        if self.cache_hidden and self.training and first > 0:
            lower = any(k not in self._hidden for k in self._hidden_keys(pb, first))
        else:
            lower = first > 0
        return (tuple(pb.input_ids.shape), answers, lower,
                tuple(self.model.state.connected), self.model.state.config.num_blocks)

    def loss(self, batch: Batch) -> torch.Tensor:
        self.model.activate(self.state_name)
        pb = self.training_batch(batch)
        kv = self.model.multimodal_kv(self._tokens(batch.tokens))

        def call(**kw):
            return self.model(pb.input_ids, pb.attention_mask, kv=kv,
                              position_ids=pb.position_ids, **kw)

        first = self.model.geometry.num_layers - self.model.state.config.num_blocks
        if self.cache_hidden and self.training and 0 < first:
            hidden = self._cached_lower(pb, first)
            with replay_lower_blocks(self.model.llm, hidden, first):
                return answer_loss(call, pb, self.config.answer_logits_only)
        return answer_loss(call, pb, self.config.answer_logits_only)

    def answer(self, questions: Sequence[str], tokens: Mapping[str, torch.Tensor]) -> list[str]:
        return self.generate(questions, tokens).answers

    def generate(self, questions: Sequence[str], tokens: Mapping[str, torch.Tensor]):
        """The :class:`mpnp.generation.Generation` behind :meth:`answer` (texts, ids and
        each step's logits: what a confidence is read from)."""
        self.model.activate(self.state_name)
        stop_at = (final_answers(self.config.stop_at_answers)
                   if self.config.stop_at_answers else None)
        return generate_answers(self.model, questions, self._tokens(tokens),
                                max_new_tokens=self.config.max_new_tokens, stop_at=stop_at)

    def fork(self, name: str) -> MPnPConnector:
        self.model.clone_state(self.state_name, name, activate=False)
        return MPnPConnector(self.model.llm, self.tokenizer, self.modalities,
                             dataclasses.replace(self.config), model=self.model,
                             state_name=name, cache_hidden=self.cache_hidden)

    def set_modalities(self, modalities: Sequence[ModalitySpec]) -> None:
        self.model.activate(self.state_name)
        state = self.model.state
        wanted = [m.name for m in modalities]
        dropped = [m for m in state.connected if m not in wanted]
        if dropped:
            self.model.disconnect(*dropped)
        for spec in modalities:
            if spec.name not in state.aligners:
                self.model.add_modality(spec)
            elif spec.name not in state.connected:
                self.model.connect(spec.name)
        self.modalities = list(modalities)

    def update_connection(self, **changes) -> None:
        """Change this state's :class:`ConnectionConfig` (e.g. for ablations): modalities
        added afterwards follow it; ``lora`` and ``train_connections`` apply at once."""
        self.model.activate(self.state_name)
        state = self.model.state
        state.config = dataclasses.replace(state.config, **changes)
        state.connections.weight.requires_grad_(state.config.train_connections)
        self.model.activate(self.state_name)  # re-reads config.lora

    def set_num_blocks(self, num_blocks: int) -> None:
        """Change N (the lower-block cache is keyed by it, so it stays valid)."""
        self.model.activate(self.state_name)
        self.model.set_num_blocks(num_blocks)
        self.config.num_blocks = num_blocks

    def clear_hidden_cache(self) -> None:
        self._hidden.clear()
