"""Prompts, training batches and incremental greedy answer generation.

The official prompt is ``question: {q} answer: {a}``; the loss covers the answer tokens (and
the end-of-sequence token that stops generation) only. Batches are left-padded, with
position ids counted from each sample's first real token, so a padded batch gives each
sample its unbatched result.

Generation uses the transformers Cache API incrementally: the multimodal K/V prefix is
computed once per query by the aligners and re-attached at every step; only the new token
runs through the LLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from mpnp.answers import normalize_answer

PROMPT = "question: {question} answer:"


def format_prompt(question: str) -> str:
    return PROMPT.format(question=question.strip())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_prefix(tokenizer) -> list[int]:
    """A BOS prefix where the tokenizer's own encoding would add one."""
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


def _left_pad(rows: Sequence[list[int]], pad_id: int, fill: int | None = None):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (B, S) left-padded
    attention_mask: torch.Tensor  # (B, S) 1 = token
    position_ids: torch.Tensor  # (B, S)
    labels: torch.Tensor | None = None  # (B, S) -100 except answer tokens

    def to(self, device: torch.device | str) -> PromptBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptBatch(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.position_ids),
            move(self.labels),
        )


def encode_prompts(tokenizer, questions: Sequence[str]) -> PromptBatch:
    """Left-padded prompts ``question: {q} answer:`` for generation."""
    if not questions:
        raise ValueError("no questions")
    bos = bos_prefix(tokenizer)
    rows = [bos + _ids(tokenizer, format_prompt(q)) for q in questions]
    ids, mask = _left_pad(rows, tokenizer.pad_token_id)
    return PromptBatch(ids, mask, position_ids_from_mask(mask))


def encode_training(tokenizer, questions: Sequence[str], answers: Sequence[str]) -> PromptBatch:
    """Left-padded ``question: {q} answer: {a}<eos>`` with labels on ``{a}<eos>`` only."""
    if len(questions) != len(answers) or not questions:
        raise ValueError("need as many answers as questions, and at least one")
    bos = bos_prefix(tokenizer)
    eos = tokenizer.eos_token_id
    rows, label_rows = [], []
    for q, a in zip(questions, answers):
        prompt = bos + _ids(tokenizer, format_prompt(q))
        answer = _ids(tokenizer, " " + a.strip()) + ([eos] if eos is not None else [])
        rows.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
    ids, mask = _left_pad(rows, tokenizer.pad_token_id)
    labels, _ = _left_pad(label_rows, -100)
    return PromptBatch(ids, mask, position_ids_from_mask(mask), labels)


def stop_token_ids(tokenizer) -> set[int]:
    """End-of-sequence plus a bare newline token: answers are one short line."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    newline = _ids(tokenizer, "\n")
    if len(newline) == 1:
        stops.add(newline[0])
    return stops


def final_answers(vocabulary: Iterable[str]) -> frozenset[str]:
    """The answers after which decoding may stop: in the vocabulary, and not the start of
    another answer of it (``"1"`` may still become ``"10"``, ``"no"`` ``"not standing"``)."""
    vocab = {normalize_answer(a) for a in vocabulary} - {""}
    return frozenset(a for a in vocab if not any(b != a and b.startswith(a) for b in vocab))


@dataclass
class Generation:
    texts: list[str]  # raw decoded answers
    answers: list[str]  # normalised for exact match
    token_ids: torch.Tensor  # (B, T) generated ids (pad after a stop)
    scores: torch.Tensor  # (B, T, vocab) logits of each generated step


@torch.no_grad()
def generate_answers(
    model,
    questions: Sequence[str],
    modality_tokens: Mapping[str, torch.Tensor] | None = None,
    *,
    max_new_tokens: int = 6,
    use_cache: bool = True,
    stop_at: frozenset[str] | None = None,
) -> Generation:
    """Greedy answers for a batch of questions with the active modalities.

    Args:
        model: an :class:`aligners.model.MPnPModel` (with its tokenizer).
        questions: the batch.
        modality_tokens: encoder tokens per connected modality, batch-aligned.
        max_new_tokens: answer length limit (nuScenes-QA answers are ≤ 3 tokens).
        use_cache: incremental decoding; ``False`` recomputes the whole sequence every step
            (only for checking the cache path).
        stop_at: closed-vocabulary serving (see :func:`final_answers`): a row stops as soon
            as its normalised text is one of these, without the forward pass that would
            only generate its stop token (each pass reads every weight; on SmolLM2 the
            passes per answer went from 2.3 to 1.8). The answer differs from free
            decoding only if the model would have gone on after a complete answer.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer")
    device = model._device()
    batch = encode_prompts(tok, questions).to(device)
    was_training = model.training
    model.eval()  # no dropout while answering
    try:
        token_ids, scores = _greedy(model, batch, modality_tokens, max_new_tokens, use_cache,
                                    stop_at)
    finally:
        model.train(was_training)
    texts = decode_until_stop(tok, token_ids)
    return Generation(texts, [normalize_answer(t) for t in texts], token_ids, scores)


def first_token_confidence(generation: Generation) -> list[float]:
    """Per answer, the softmax probability of its first generated token (greedy, so the
    largest): a cheap confidence, read from logits the decoding computed anyway."""
    if generation.scores.shape[1] == 0:
        return [1.0] * len(generation.answers)
    probs = torch.softmax(generation.scores[:, 0, :].float(), dim=-1)
    return [float(p) for p in probs.max(dim=-1).values]


def decode_until_stop(tokenizer, token_ids: torch.Tensor) -> list[str]:
    """Decoded text of each row of generated ids, up to its first stop token."""
    stops = stop_token_ids(tokenizer)
    texts = []
    for row in token_ids.tolist():
        kept = []
        for t in row:
            if t in stops:
                break
            kept.append(t)
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts


def _greedy(model, batch: PromptBatch, modality_tokens, max_new_tokens: int, use_cache: bool,
            stop_at: frozenset[str] | None = None):
    """The decoding loop: ``(B, T)`` token ids and ``(B, T, vocab)`` step logits.

    A row that ends on a complete answer (``stop_at``) is padded with a stop token from
    then on, so :func:`decode_until_stop` ends it there as it does a generated stop."""
    tok = model.tokenizer
    device = batch.input_ids.device
    kv = model.multimodal_kv(modality_tokens or {})  # once per query
    stops = torch.tensor(sorted(stop_token_ids(tok)), device=device)
    if stop_at and stops.numel() == 0:
        raise ValueError("stop_at needs a tokenizer with an end-of-sequence token")
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    cache = DynamicCache() if use_cache else None
    step_ids = ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    answered = torch.zeros_like(done)  # done on a complete answer (stop_at), not a stop token
    out_tokens, out_scores = [], []
    with model.prefix(kv):
        for _ in range(max_new_tokens):
            if use_cache:
                step_pos = pos if cache.get_seq_length() == 0 else pos[:, -1:]
                out = model.llm(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=step_pos,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            else:
                out = model.llm(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=False,
                    logits_to_keep=1,
                )
            step_scores = out.logits[:, -1, :]
            next_ids = step_scores.argmax(-1)
            next_ids = torch.where(done, torch.full_like(next_ids, tok.pad_token_id), next_ids)
            next_ids = torch.where(answered, stops[0], next_ids)
            out_tokens.append(next_ids)
            out_scores.append(step_scores)
            done |= torch.isin(next_ids, stops)
            if stop_at:
                generated = torch.stack(out_tokens, dim=1)
                for row in (~done).nonzero().flatten().tolist():
                    text = tok.decode(generated[row].tolist(), skip_special_tokens=True)
                    if normalize_answer(text) in stop_at:
                        answered[row] = done[row] = True
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
            step_ids = next_ids[:, None]
            if bool(done.all()):
                break
    return torch.stack(out_tokens, dim=1), torch.stack(out_scores, dim=1)
