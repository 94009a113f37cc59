"""Incremental (cached) generation equals full recomputation; padding does not change answers."""

from __future__ import annotations

import torch

from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from mpnp.generation import encode_prompts, encode_training, generate_answers, stop_token_ids

QUESTIONS = ["How many cars are there?", "Is there a bus?", "What status is the truck?"]


def _model(tiny):
    llm, tok = tiny
    model = MPnPModel(llm, tok)
    model.create_state("s", [ModalitySpec("camera", 8, 3)], ConnectionConfig(num_blocks=2))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameter_groups()["lora"].values():
            p.normal_(std=0.05)
    return model, {"camera": torch.randn(len(QUESTIONS), 3, 8)}


def test_cached_generation_equals_full_recompute(tiny):
    model, tokens = _model(tiny)
    fast = generate_answers(model, QUESTIONS, tokens, max_new_tokens=5)
    slow = generate_answers(model, QUESTIONS, tokens, max_new_tokens=5, use_cache=False)
    assert torch.equal(fast.token_ids, slow.token_ids)
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-5, rtol=1e-5)
    assert fast.texts == slow.texts


def test_padded_batch_equals_unbatched(tiny):
    model, tokens = _model(tiny)
    batched = generate_answers(model, QUESTIONS, tokens, max_new_tokens=4)
    for i, q in enumerate(QUESTIONS):
        single = generate_answers(
            model, [q], {"camera": tokens["camera"][i : i + 1]}, max_new_tokens=4
        )
        n = single.token_ids.shape[1]
        assert torch.equal(batched.token_ids[i, :n], single.token_ids[0])
        torch.testing.assert_close(batched.scores[i, :n], single.scores[0], atol=1e-5, rtol=1e-5)
        assert batched.texts[i] == single.texts[0]


def test_training_batch_labels_cover_only_the_answer(llama):
    _, tok = llama
    batch = encode_training(tok, ["Is there a car?", "How many buses are there?"], ["yes", "10"])
    for row_ids, row_labels in zip(batch.input_ids, batch.labels):
        kept = row_ids[row_labels != -100].tolist()
        assert tok.decode(kept[:-1]).strip() in ("yes", "10")
        assert kept[-1] == tok.eos_token_id
    # Left padding: the last column is real for every row.
    assert bool(batch.attention_mask[:, -1].all())
    assert tok.eos_token_id in stop_token_ids(tok)


def test_prompts_are_left_padded_with_positions_from_first_token(llama):
    _, tok = llama
    batch = encode_prompts(tok, ["a?", "a longer question?"])
    first_real = int(batch.attention_mask[0].argmax())
    assert first_real > 0 and batch.position_ids[0, first_real] == 0
    assert batch.position_ids[1, 0] == 0
