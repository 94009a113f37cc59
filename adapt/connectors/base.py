"""The one interface every way of connecting sensors to the LLM implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapt.features import Batch
from aligners.config import ModalitySpec
from mpnp.generation import PromptBatch, encode_training


@dataclass
class ConnectorConfig:
    """Options shared by every connector; a method reads the fields that concern it."""

    num_blocks: int = 8  # mPnP: N connected blocks
    num_prompts: int = 20  # PromptFuse / eP-ALM soft prompts
    max_new_tokens: int = 6
    answer_logits_only: bool = True  # compute LM logits only where the loss needs them
    # mPnP serving: stop a row's decoding on a complete answer of this closed vocabulary
    # (mpnp.generation.final_answers); empty: decode until a stop token or the limit.
    stop_at_answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_blocks < 0 or self.num_prompts < 0 or self.max_new_tokens < 1:
            raise ValueError("num_blocks, num_prompts must be >= 0 and max_new_tokens >= 1")


def answer_loss(llm_call, batch: PromptBatch, answer_logits_only: bool, **kwargs) -> torch.Tensor:
    """Causal-LM loss on the answer tokens only.

    Answers are at the end of every left-padded row, so only the last ``k + 1`` positions
    (``k`` = longest answer incl. EOS) need LM-head logits: with a 49k vocabulary that skips
    most of the output-embedding cost.
    """
    labels = batch.labels
    if answer_logits_only:
        first = int((labels != -100).float().argmax(dim=1).min())
        k = labels.shape[1] - first
        out = llm_call(logits_to_keep=k + 1, **kwargs)
        logits, targets = out.logits[:, :-1], labels[:, -k:]
    else:
        out = llm_call(**kwargs)
        logits, targets = out.logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


class Connector(nn.Module, ABC):
    """Trains on :class:`adapt.features.Batch` es and answers questions.

    Subclasses choose what trains *by structure* (:meth:`parameter_groups`); the trainer
    builds one optimizer group per name with the learning rate configured for that name.
    """

    #: Registry name.
    kind: str = ""

    def __init__(self, llm: nn.Module, tokenizer, modalities: Sequence[ModalitySpec],
                 config: ConnectorConfig):
        super().__init__()
        self.tokenizer = tokenizer
        self.modalities = list(modalities)
        self.config = config

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    @abstractmethod
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable tensors by group name (``aligners``, ``lora``, ``llm``, ``prompts`` ...)."""

    @abstractmethod
    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean answer-token loss of a batch."""

    @abstractmethod
    def answer(self, questions: Sequence[str], tokens: Mapping[str, torch.Tensor]) -> list[str]:
        """Normalised greedy answers."""

    @abstractmethod
    def fork(self, name: str) -> Connector:
        """An independent copy of the trained parts that shares the frozen LLM.

        Runtime Adapt trains a fork while the original keeps serving untouched.
        """

    @abstractmethod
    def set_modalities(self, modalities: Sequence[ModalitySpec]) -> None:
        """Serve ``modalities`` from now on (in memory; Algorithm 1's Reconnect is loading
        a set's encoders and aligners from storage and connecting them, the backend's job).

        What is trained for a modality that stays is kept; a new modality gets fresh
        parameters; a dropped one stops reaching the LLM.
        """

    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_trainable(self) -> list[str]:
        """Freeze everything but :meth:`parameter_groups`; return the trainable names."""
        self.requires_grad_(False)
        wanted = {id(p) for ps in self.parameter_groups().values() for p in ps}
        names = []
        for name, p in self.named_parameters():
            if id(p) in wanted:
                p.requires_grad_(True)
                names.append(name)
        return names

    def training_batch(self, batch: Batch) -> PromptBatch:
        return encode_training(self.tokenizer, batch.questions, batch.answers).to(self.device())
