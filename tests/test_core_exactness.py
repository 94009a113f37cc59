"""Nothing connected = the base LLM, bit for bit; unconnected blocks see no extra keys."""

from __future__ import annotations

import pytest
import torch

import aligners.injection as injection
from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from mpnp.generation import encode_prompts
from mpnp.tiny import tiny_llm

QUESTIONS = ["How many cars are there?", "Is there a bus?"]


def _logits(model_call, batch):
    return model_call(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_nothing_connected_equals_base_exactly(family, attn):
    llm, tok = tiny_llm(family, num_layers=4, attn_implementation=attn)
    batch = encode_prompts(tok, QUESTIONS)
    base = _logits(llm, batch)
    model = MPnPModel(llm, tok)
    assert llm.config._attn_implementation == f"mpnp_{attn}"
    # No state at all.
    assert torch.equal(_logits(model, batch), base)
    # A state whose modality is disconnected (its LoRA exists but must be off).
    model.create_state("s", [ModalitySpec("camera", 8, 3)], ConnectionConfig(num_blocks=2))
    with torch.no_grad():
        for p in model.parameter_groups()["lora"].values():
            p.normal_()  # non-zero LoRA: any leak would show
    model.disconnect("camera")
    assert torch.equal(_logits(model, batch), base)
    # Connected but N = 0.
    model.connect("camera")
    model.set_num_blocks(0)
    out = model(
        batch.input_ids,
        batch.attention_mask,
        {"camera": torch.randn(2, 3, 8)},
        position_ids=batch.position_ids,
    ).logits
    assert torch.equal(out, base)
    # Back to the base LLM by deactivating.
    model.set_num_blocks(2)
    model.activate(None)
    assert torch.equal(_logits(model, batch), base)


def test_only_last_n_blocks_see_extra_keys(monkeypatch, llama):
    llm, tok = llama
    seen: dict[int, int] = {}
    real = injection._base_function

    def spy(module, base_name):
        fn = real(module, base_name)

        def wrapped(mod, q, k, v, mask, **kw):
            seen[mod.layer_idx] = k.shape[2]
            return fn(mod, q, k, v, mask, **kw)

        return wrapped

    monkeypatch.setattr(injection, "_base_function", spy)
    model = MPnPModel(llm, tok)
    model.create_state(
        "s",
        [ModalitySpec("camera", 8, 3), ModalitySpec("lidar", 6, 4)],
        ConnectionConfig(num_blocks=2),
    )
    batch = encode_prompts(tok, ["Is there a car?"])
    text_len = batch.input_ids.shape[1]
    model(
        batch.input_ids,
        batch.attention_mask,
        {"camera": torch.randn(1, 3, 8), "lidar": torch.randn(1, 4, 6)},
    )
    assert seen == {0: text_len, 1: text_len, 2: text_len + 7, 3: text_len + 7}
    model.disconnect("lidar")
    model(batch.input_ids, batch.attention_mask, {"camera": torch.randn(1, 3, 8)})
    assert seen == {0: text_len, 1: text_len, 2: text_len + 3, 3: text_len + 3}
    model.set_num_blocks(3)
    model(batch.input_ids, batch.attention_mask, {"camera": torch.randn(1, 3, 8)})
    assert seen == {0: text_len, 1: text_len + 3, 2: text_len + 3, 3: text_len + 3}


def test_missing_tokens_for_connected_modality_is_an_error(llama):
    llm, tok = llama
    model = MPnPModel(llm, tok)
    model.create_state("s", [ModalitySpec("camera", 8, 3)], ConnectionConfig(num_blocks=2))
    batch = encode_prompts(tok, ["Is there a car?"])
    with pytest.raises(ValueError, match="camera"):
        model(batch.input_ids, batch.attention_mask, {})
    with pytest.raises(ValueError, match="expected tokens"):
        model(batch.input_ids, batch.attention_mask, {"camera": torch.randn(1, 4, 8)})


def test_unsupported_attention_implementation_is_refused():
    from transformers import AutoModelForCausalLM

    from mpnp.tiny import char_tokenizer, tiny_config

    tok = char_tokenizer()
    llm = AutoModelForCausalLM.from_config(
        tiny_config("llama", len(tok)), attn_implementation="sdpa"
    )
    llm.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="not supported"):
        MPnPModel(llm, tok)


def _isolated_in(layers, mask):
    return lambda layer_idx: mask if layer_idx in layers else None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_isolated_span_is_invisible_to_the_rest_in_its_blocks(family, attn):
    """Isolating a span in every block makes the positions after it independent of its
    content; isolating it in the lower blocks only does not."""
    llm, tok = tiny_llm(family, num_layers=4, attn_implementation=attn)
    model = MPnPModel(llm, tok)
    a = encode_prompts(tok, ["xxxx is there a bus?"])
    b = encode_prompts(tok, ["yyyy is there a bus?"])
    assert a.input_ids.shape == b.input_ids.shape
    span = a.input_ids != b.input_ids  # the differing prefix words
    assert span.any()
    last = lambda batch: _logits(model, batch)[:, -1]  # noqa: E731
    with model.isolating(_isolated_in(range(4), span)):
        assert torch.allclose(last(a), last(b), atol=1e-5)
    with model.isolating(_isolated_in(range(2), span)):
        assert not torch.allclose(last(a), last(b), atol=1e-3)
    # Nothing isolated: the base LLM bit for bit.
    base = _logits(llm, a)
    with model.isolating(lambda layer_idx: None):
        assert torch.equal(_logits(model, a), base)


def test_isolation_holds_through_cached_decoding(llama):
    """Decoding steps (one query, cached keys) keep the span closed: greedy answers do not
    depend on the isolated words."""
    from mpnp.generation import generate_answers

    llm, tok = llama
    model = MPnPModel(llm, tok)
    a = encode_prompts(tok, ["xxxx is there a bus?"])
    b = encode_prompts(tok, ["yyyy is there a bus?"])
    span = a.input_ids != b.input_ids
    extended = {}

    def provider(layer_idx):
        return extended.get("mask")

    def scores(question, isolate):
        extended["mask"] = (torch.cat([span, torch.zeros(1, 16, dtype=torch.bool)], 1)
                            if isolate else None)
        with model.isolating(provider):
            return generate_answers(model, [question], {}, max_new_tokens=6).scores

    x, y = "xxxx is there a bus?", "yyyy is there a bus?"
    assert torch.allclose(scores(x, True), scores(y, True), atol=1e-5)
    assert not torch.allclose(scores(x, False), scores(y, False), atol=1e-3)
    with pytest.raises(RuntimeError, match="already active"):
        with model.isolating(provider), model.isolating(provider):
            pass
