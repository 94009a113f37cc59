"""Save -> load reproduces outputs exactly; wrong LLM, wrong N and corrupt files fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from aligners.state import StateError, load_state, read_state_config, save_state
from mpnp.generation import encode_prompts
from mpnp.tiny import tiny_llm

SPECS = [ModalitySpec("camera", 8, 3), ModalitySpec("lidar", 6, 2)]


def _trained_model(seed=0, family="llama"):
    llm, tok = tiny_llm(family, num_layers=4, seed=seed)
    model = MPnPModel(llm, tok)
    model.create_state("night", SPECS, ConnectionConfig(num_blocks=3, gate="scale"))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.state_tensors().values():
            p.add_(torch.randn_like(p) * 0.1)  # "trained": nothing at its init value
    model.disconnect("camera")
    return model


def _logits(model):
    batch = encode_prompts(model.tokenizer, ["How many cars?", "Is there a bus?"])
    torch.manual_seed(5)
    tokens = {"camera": torch.randn(2, 3, 8), "lidar": torch.randn(2, 2, 6)}
    with torch.no_grad():
        return model(
            batch.input_ids, batch.attention_mask, tokens, position_ids=batch.position_ids
        ).logits


def test_round_trip_is_exact(tmp_path, family):
    model = _trained_model(family=family)
    expected = _logits(model)
    save_state(model, tmp_path / "night")
    fresh_llm, tok = tiny_llm(family, num_layers=4, seed=0)
    fresh = MPnPModel(fresh_llm, tok)
    assert load_state(fresh, tmp_path / "night") == "night"
    assert fresh.state.connected == ["lidar"] and fresh.state.config.num_blocks == 3
    assert torch.equal(_logits(fresh), expected)
    for k, v in model.state_tensors().items():
        assert torch.equal(v, fresh.state_tensors()[k]), k


def test_config_names_type_version_and_llm(tmp_path):
    model = _trained_model()
    save_state(model, tmp_path / "s")
    cfg = read_state_config(tmp_path / "s")
    assert cfg["type"] == "mpnp.adapted_state" and cfg["format_version"] == 1
    assert cfg["num_blocks"] == 3 and cfg["llm"]["num_layers"] == 4
    assert {m["name"] for m in cfg["modalities"]} == {"camera", "lidar"}


def test_loading_onto_another_llm_fails_clearly(tmp_path):
    save_state(_trained_model(seed=0), tmp_path / "s")
    other_llm, tok = tiny_llm("llama", num_layers=4, seed=1)  # same shape, other weights
    other = MPnPModel(other_llm, tok)
    with pytest.raises(StateError, match="another LLM.*embedding_sha256"):
        load_state(other, tmp_path / "s")
    deeper_llm, tok = tiny_llm("llama", num_layers=6, seed=0)
    with pytest.raises(StateError, match="num_layers"):
        load_state(MPnPModel(deeper_llm, tok), tmp_path / "s")
    assert other.states.keys() == set()  # nothing half-loaded


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_state_made_in_float32_loads_onto_a_half_precision_copy(tmp_path, dtype):
    """A state prepared in float32 serves the same LLM deployed in half precision (the
    shipped Orin config); another LLM in half precision is still refused."""
    save_state(_trained_model(seed=0), tmp_path / "s")
    same_llm, tok = tiny_llm("llama", num_layers=4, seed=0)
    same = MPnPModel(same_llm.to(dtype), tok)
    load_state(same, tmp_path / "s", name="night")
    assert "night" in same.states
    other_llm, tok = tiny_llm("llama", num_layers=4, seed=1)
    with pytest.raises(StateError, match="another LLM.*float32 saved, .*differ beyond"):
        load_state(MPnPModel(other_llm.to(dtype), tok), tmp_path / "s")


def test_loading_with_another_n_fails_clearly(tmp_path):
    save_state(_trained_model(), tmp_path / "s")
    llm, tok = tiny_llm("llama", num_layers=4, seed=0)
    model = MPnPModel(llm, tok)
    with pytest.raises(StateError, match="N=3 blocks, expected N=2"):
        load_state(model, tmp_path / "s", num_blocks=2)


def test_corrupt_or_missing_files_fail_clearly(tmp_path):
    save_state(_trained_model(), tmp_path / "s")
    llm, tok = tiny_llm("llama", num_layers=4, seed=0)
    model = MPnPModel(llm, tok)
    with pytest.raises(StateError, match="missing"):
        load_state(model, tmp_path / "nowhere")
    tensors = tmp_path / "s" / "state.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-10] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(StateError, match="checksum"):
        load_state(model, tmp_path / "s")
    (tmp_path / "s" / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="corrupt"):
        load_state(model, tmp_path / "s")
    (tmp_path / "s" / "state.json").write_text(json.dumps({"type": "other"}))
    with pytest.raises(StateError, match="type"):
        load_state(model, tmp_path / "s")
    assert not model.states
