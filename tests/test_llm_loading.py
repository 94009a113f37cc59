"""Loading LLMs from local directories; clear errors for missing or corrupt files."""

from __future__ import annotations

import pytest
import torch

from mpnp.llm import LLMLoadError, llm_fingerprint, llm_geometry, load_llm
from mpnp.tiny import tiny_llm


@pytest.fixture
def saved_tiny(tmp_path):
    llm, tok = tiny_llm("qwen2", num_layers=3)
    llm.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m", llm


def test_local_directory_loads_frozen_with_same_weights(saved_tiny):
    path, original = saved_tiny
    llm, tok = load_llm(path)
    assert not llm.training and not any(p.requires_grad for p in llm.parameters())
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert llm_fingerprint(llm) == llm_fingerprint(original) | {
        "name": llm_fingerprint(llm)["name"]
    }
    geom = llm_geometry(llm)
    assert (geom.num_layers, geom.num_kv_heads, geom.kv_width) == (3, 2, 32)


def test_missing_directory_names_path_and_fix(tmp_path):
    with pytest.raises(LLMLoadError, match=r"not found: .*nowhere.*Fix"):
        load_llm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMLoadError, match="no config.json"):
        load_llm(tmp_path / "empty")
    with pytest.raises(LLMLoadError, match="GGUF file not found"):
        load_llm(tmp_path / "model.gguf")


def test_corrupt_weights_name_path(saved_tiny):
    path, _ = saved_tiny
    weights = next(path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(LLMLoadError, match=str(path)):
        load_llm(path)


def test_geometry_is_gqa_aware(family):
    llm, _ = tiny_llm(family, num_layers=2)
    geom = llm_geometry(llm)
    expected_kv_heads = 4 if family == "opt" else 2  # OPT has no grouped-query attention
    assert geom.num_kv_heads == expected_kv_heads
    assert geom.kv_width == geom.num_kv_heads * geom.head_dim
    assert torch.is_tensor(llm.get_input_embeddings().weight)
