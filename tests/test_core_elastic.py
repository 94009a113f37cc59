"""Runtime elasticity on the resident model: connect/disconnect, change N, swap states."""

from __future__ import annotations

import pytest
import torch

from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from mpnp.generation import encode_prompts


def _run(model, tokens):
    batch = encode_prompts(model.tokenizer, ["How many cars?"])
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, tokens).logits


def test_changing_n_keeps_lora_of_blocks_that_stay(llama):
    llm, tok = llama
    model = MPnPModel(llm, tok)
    model.create_state("s", [ModalitySpec("camera", 8, 3)], ConnectionConfig(num_blocks=2))
    with torch.no_grad():
        for p in model.parameter_groups()["lora"].values():
            p.fill_(0.5)
    model.set_num_blocks(3)
    lora = model.parameter_groups()["lora"]
    assert {int(k.split(".")[1]) for k in lora} == {1, 2, 3}
    assert (lora["lora.1.k_proj.lora_B"] == 0).all()  # new block: fresh, ΔW = 0
    assert (lora["lora.3.k_proj.lora_B"] == 0.5).all()  # kept block: kept weights
    model.set_num_blocks(1)
    assert {int(k.split(".")[1]) for k in model.parameter_groups()["lora"]} == {3}
    with pytest.raises(ValueError):
        model.set_num_blocks(5)


def test_states_swap_without_touching_the_llm(llama):
    llm, tok = llama
    model = MPnPModel(llm, tok)
    weights_before = {k: v.clone() for k, v in llm.state_dict().items() if "lora_" not in k}
    tokens = {"camera": torch.randn(1, 3, 8), "lidar": torch.randn(1, 4, 6)}
    model.create_state("day", [ModalitySpec("camera", 8, 3)], ConnectionConfig(num_blocks=2))
    day = _run(model, tokens)
    model.create_state("night", [ModalitySpec("lidar", 6, 4)], ConnectionConfig(num_blocks=3))
    night = _run(model, tokens)
    assert not torch.equal(day, night)
    model.activate("day")
    assert torch.equal(_run(model, tokens), day)
    model.activate("night")
    assert torch.equal(_run(model, tokens), night)
    # Reconnect: add the camera to the night state (C -> C+L) without reloading anything.
    model.add_modality(ModalitySpec("camera", 8, 3))
    assert model.state.connected == ["lidar", "camera"]
    both = _run(model, tokens)
    assert not torch.equal(both, night)
    model.disconnect("camera")
    assert torch.equal(_run(model, tokens), night)
    model.remove_state("night")
    assert model.state is None and list(model.states) == ["day"]
    after = {k: v for k, v in llm.state_dict().items() if "lora_" not in k}
    after = {k.replace(".base_layer", ""): v for k, v in after.items()}
    assert after.keys() == weights_before.keys()
    assert all(torch.equal(after[k], weights_before[k]) for k in after)


def test_bad_names_are_clear_errors(llama):
    llm, tok = llama
    model = MPnPModel(llm, tok)
    with pytest.raises(RuntimeError, match="no adapted state"):
        model.connect("camera")
    model.create_state("s", [ModalitySpec("camera", 8, 3)], ConnectionConfig(num_blocks=2))
    with pytest.raises(KeyError, match="no aligners for 'radar'"):
        model.connect("radar")
    with pytest.raises(KeyError, match="unknown state"):
        model.activate("nope")
    with pytest.raises(ValueError, match="exists"):
        model.create_state("s", [])
    with pytest.raises(ValueError, match="num_blocks"):
        model.create_state("t", [], ConnectionConfig(num_blocks=9))


def test_init_alpha_starts_every_connection_nearly_closed(llama):
    llm, tok = llama
    model = MPnPModel(llm, tok)
    tokens = {"camera": 3.0 * torch.randn(1, 3, 8)}
    base = _run(model, {})
    model.create_state("closed", [ModalitySpec("camera", 8, 3)],
                       ConnectionConfig(num_blocks=2, gate="logit", init_alpha=0.01))
    state = model.states["closed"]
    alphas = torch.stack([state.connections.alpha(j) for j in range(llm.config.num_hidden_layers)])
    torch.testing.assert_close(alphas, torch.full_like(alphas, 0.01))
    closed = _run(model, tokens)
    model.create_state("open", [ModalitySpec("camera", 8, 3)],
                       ConnectionConfig(num_blocks=2, gate="logit", init_alpha=0.9))
    opened = _run(model, tokens)
    # Nearly closed, the tokens barely move the base model's logits; wide open they do.
    assert (closed - base).abs().max() < 0.2 * (opened - base).abs().max()
    with pytest.raises(ValueError, match="init_alpha"):
        ConnectionConfig(init_alpha=1.0)


def test_copy_aligners_brings_pretrained_aligners_into_another_state(llama):
    llm, tok = llama
    model = MPnPModel(llm, tok)
    lidar = ModalitySpec("lidar", 8, 2)
    model.create_state("pretrained", [lidar], ConnectionConfig(num_blocks=2))
    with torch.no_grad():
        for p in model.states["pretrained"].aligners["lidar"].parameters():
            p.add_(torch.randn_like(p))
    model.create_state("serving", [ModalitySpec("camera", 8, 3)], ConnectionConfig(num_blocks=2))
    model.add_modality(lidar)
    assert not torch.equal(model.states["serving"].aligners["lidar"].key_pos,
                           model.states["pretrained"].aligners["lidar"].key_pos)
    model.copy_aligners("pretrained", "lidar")
    mine = model.states["serving"].aligners["lidar"].state_dict()
    theirs = model.states["pretrained"].aligners["lidar"].state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert mine["key_pos"].data_ptr() != theirs["key_pos"].data_ptr()  # a copy, not shared
    with pytest.raises(ValueError, match="aligners of"):
        model.add_modality(ModalitySpec("radar", 8, 5))
        model.create_state("other", [ModalitySpec("radar", 8, 4)], ConnectionConfig(num_blocks=1))
        model.activate("serving")
        model.copy_aligners("other", "radar")
