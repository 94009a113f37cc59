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


def test_stop_at_complete_answers_ends_rows_early(llama):
    """Closed-vocabulary serving: a row stops on the first prefix of its free decoding that
    is a complete answer no other answer extends; other rows decode as before."""
    from mpnp.answers import normalize_answer
    from mpnp.generation import final_answers

    model, tokens = _model(llama)
    tok = model.tokenizer
    with torch.no_grad():  # no end-of-sequence: rows run to the limit when decoding freely
        head = model.llm.get_output_embeddings().weight
        head[tok.eos_token_id] = -3 * head[tok.convert_tokens_to_ids("@")]
    free = generate_answers(model, QUESTIONS, tokens, max_new_tokens=5)
    prefixes = [[normalize_answer(tok.decode(row[:k])) for k in range(1, 6)]
                for row in free.token_ids.tolist()]
    vocabulary = {prefixes[1][2], prefixes[2][3], prefixes[1][1]}  # the last extends...
    stop = final_answers(vocabulary)
    assert prefixes[1][1] not in stop  # ...into the others, so it cannot end a row
    assert stop == vocabulary - {prefixes[1][1]} and not final_answers(["", "!"])

    calls = []
    hook = model.llm.register_forward_hook(lambda *a: calls.append(1))
    try:
        early = generate_answers(model, QUESTIONS, tokens, max_new_tokens=5, stop_at=stop)
        free_calls, calls[:] = len(calls), []
        generate_answers(model, QUESTIONS[1:], {"camera": tokens["camera"][1:]},
                         max_new_tokens=5, stop_at=stop)
    finally:
        hook.remove()
    for row, text in enumerate(early.texts):
        cut = next((k for k, p in enumerate(prefixes[row], 1) if p in stop), 5)
        assert text == tok.decode(free.token_ids[row, :cut].tolist(),
                                  skip_special_tokens=True).strip()
    assert early.texts[0] == free.texts[0] and early.texts[1] != free.texts[1]
    assert free_calls == 5 and len(calls) == 4  # the rows that stop need fewer passes
