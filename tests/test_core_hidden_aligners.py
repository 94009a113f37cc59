"""Hidden-space aligners and per-block maps (``ConnectionConfig.aligner_space`` / ``block_maps``).

Each connected block makes its own keys and values from the aligners' hidden states with its
frozen projections; LoRA stays on text tokens; the maps start at the identity.
"""

from __future__ import annotations

import pytest
import torch

from aligners.compose import CompositionError, compose_states
from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from aligners.state import load_state, read_state, save_state, snapshot_state, write_state
from mpnp.llm import attention_input_norms, attention_modules
from mpnp.tiny import tiny_llm

SPEC = ModalitySpec("camera", 8, 3)


def _model(family="llama", **config):
    llm, tok = tiny_llm(family, num_layers=3)
    model = MPnPModel(llm, tok)
    torch.manual_seed(0)
    model.create_state("s", [SPEC], ConnectionConfig(num_blocks=2, gate="logit", **config))
    return model


def _ids(model, text="abc de"):
    return torch.tensor([model.tokenizer.encode(text)])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_hidden_space_keys_are_each_blocks_own_projection_of_the_aligned_state(family):
    model = _model(family, aligner_space="hidden")
    tokens = {"camera": torch.randn(2, 3, 8)}
    aligner = model.state.aligners["camera"]
    assert aligner.key.net[-1].out_features == model.geometry.hidden_size
    kv = model.multimodal_kv(tokens)
    u_k, u_v = aligner(tokens["camera"])
    g = model.geometry
    for layer in model.state.connected_layers():
        attn = attention_modules(model.llm)[layer]
        norm = attention_input_norms(model.llm)[layer]
        ref_k = attn.k_proj(norm(u_k)).view(2, 3, g.num_kv_heads, g.head_dim).transpose(1, 2)
        ref_v = attn.v_proj(norm(u_v)).view(2, 3, g.num_kv_heads, g.head_dim).transpose(1, 2)
        k, v = kv.block(layer)
        torch.testing.assert_close(k, ref_k)
        torch.testing.assert_close(v, ref_v)
    first, second = model.state.connected_layers()
    assert not torch.allclose(kv.block(first)[0], kv.block(second)[0])


def test_lora_acts_on_text_tokens_only():
    model = _model(aligner_space="hidden")
    tokens = {"camera": torch.randn(1, 3, 8)}
    before = [t.clone() for t in model.multimodal_kv(tokens).block(2)]
    text_before = model(_ids(model), modality_tokens=tokens).logits
    with torch.no_grad():
        for name, p in model.parameter_groups()["lora"].items():
            if name.endswith("lora_B"):
                p.normal_()
    after = model.multimodal_kv(tokens).block(2)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(text_before, model(_ids(model), modality_tokens=tokens).logits)


@pytest.mark.parametrize("space", ["kv", "hidden"])
def test_block_maps_start_at_the_identity_and_then_differ_per_block(space):
    plain = _model(aligner_space=space)
    mapped = _model(aligner_space=space, block_maps=True)
    shared = {k: v for k, v in mapped.state_tensors().items() if "block_" not in k}
    assert set(shared) == set(plain.state_tensors())
    with torch.no_grad():
        for k, v in plain.state_tensors().items():
            v.copy_(shared[k])
    tokens = {"camera": torch.randn(1, 3, 8)}
    ids = _ids(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids, modality_tokens=tokens).logits,
                                   mapped(ids, modality_tokens=tokens).logits)
        mapped.state.aligners["camera"].block_key[2].mul_(2.0)
        kv = mapped.multimodal_kv(tokens)
        torch.testing.assert_close(kv.block(2)[0], 2.0 * plain.multimodal_kv(tokens).block(2)[0])
        torch.testing.assert_close(kv.block(1)[0], plain.multimodal_kv(tokens).block(1)[0])


def test_gradients_reach_hidden_aligners_and_block_maps():
    model = _model(aligner_space="hidden", block_maps=True)
    model.set_trainable()
    out = model(_ids(model), modality_tokens={"camera": torch.randn(1, 3, 8)})
    out.logits.pow(2).mean().backward()
    aligner = model.state.aligners["camera"]
    assert aligner.key.net[0].weight.grad.abs().sum() > 0
    assert aligner.value.net[0].weight.grad.abs().sum() > 0
    connected = list(model.state.connected_layers())
    assert aligner.block_key.grad[connected].abs().sum() > 0
    assert aligner.block_key.grad[0].abs().sum() == 0  # block 0 is not connected


def test_hidden_state_with_maps_saves_and_loads_to_the_same_outputs(tmp_path):
    model = _model(aligner_space="hidden", block_maps=True)
    with torch.no_grad():
        model.state.aligners["camera"].block_value.add_(0.1 * torch.randn_like(
            model.state.aligners["camera"].block_value))
    tokens = {"camera": torch.randn(1, 3, 8)}
    ids = _ids(model)
    with torch.no_grad():
        want = model(ids, modality_tokens=tokens).logits
    save_state(model, tmp_path / "s")
    model.remove_state("s")
    assert load_state(model, tmp_path / "s") == "s"
    assert model.state.config.aligner_space == "hidden" and model.state.config.block_maps
    with torch.no_grad():
        torch.testing.assert_close(model(ids, modality_tokens=tokens).logits, want)


def test_states_of_different_aligner_spaces_do_not_compose_or_share_aligners(tmp_path):
    model = _model(aligner_space="hidden")
    torch.manual_seed(1)
    model.create_state("k", [SPEC], ConnectionConfig(num_blocks=2, gate="logit"))
    a, b = snapshot_state(model, "s"), snapshot_state(model, "k")
    with pytest.raises(CompositionError, match="aligner_space"):
        compose_states([a, b], method="naive")
    with pytest.raises(ValueError, match="aligner_space"):
        model.copy_aligners("s", "camera")  # the active state is "k"


def test_states_saved_before_the_fields_existed_load_as_paper_aligners(tmp_path):
    model = _model()
    save_state(model, tmp_path / "old")
    data = read_state(tmp_path / "old")
    for key in ("aligner_space", "block_maps"):
        data.config["connection"].pop(key)
    model.remove_state("s")

    write_state(data, tmp_path / "old2")
    load_state(model, tmp_path / "old2")
    assert model.state.config.aligner_space == "kv" and not model.state.config.block_maps


def test_the_cost_model_counts_the_per_block_projections_and_maps():
    from mpnp.cost_model import adaptation_cost, aligner_flops_per_token

    kv = aligner_flops_per_token(8, 32)
    assert kv == 2 * 2 * (8 * 32 + 32 * 32)
    hidden = aligner_flops_per_token(8, 32, hidden_size=64, num_layers=3)
    assert hidden == 2 * 2 * (8 * 32 + 32 * 64) + 3 * 2 * 2 * 64 * 32
    mapped = aligner_flops_per_token(8, 32, hidden_size=64, num_layers=3, head_dim=16)
    assert mapped == hidden + 3 * 2 * 2 * 32 * 16
    llm, _ = tiny_llm("llama", num_layers=3)
    paper = adaptation_cost(llm, [SPEC], 20)
    assert adaptation_cost(llm, [SPEC], 20, connection=ConnectionConfig()) == paper
    richer = adaptation_cost(llm, [SPEC], 20, connection=ConnectionConfig(
        aligner_space="hidden", block_maps=True))
    assert richer.forward > paper.forward and richer.dy_llm == paper.dy_llm
