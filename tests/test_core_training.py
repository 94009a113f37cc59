"""One training step trains exactly the mPnP parameters of the connected blocks."""

from __future__ import annotations

import torch

from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from mpnp.generation import encode_training


def test_one_step_reaches_exactly_the_trainable_parts(tiny):
    llm, tok = tiny
    model = MPnPModel(llm, tok)
    n_layers = model.geometry.num_layers
    model.create_state(
        "s",
        [ModalitySpec("camera", 8, 3), ModalitySpec("lidar", 6, 2)],
        ConnectionConfig(num_blocks=2, lora_dropout=0.0),
    )
    trainable = set(model.set_trainable())
    model.train()

    # Record which blocks build an autograd graph (and so keep activations for backward).
    from mpnp.llm import attention_modules

    needs_grad = {}
    hooks = [
        a.register_forward_hook(
            lambda m, i, o: needs_grad.__setitem__(m.layer_idx, o[0].requires_grad)
        )
        for a in attention_modules(llm)
    ]
    batch = encode_training(tok, ["Is there a car?", "How many buses?"], ["yes", "2"])
    tokens = {"camera": torch.randn(2, 3, 8), "lidar": torch.randn(2, 2, 6)}
    out = model(
        batch.input_ids,
        batch.attention_mask,
        tokens,
        position_ids=batch.position_ids,
        labels=batch.labels,
    )
    out.loss.backward()
    for h in hooks:
        h.remove()

    first = n_layers - 2
    assert needs_grad == {i: i >= first for i in range(n_layers)}

    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected.add(name)
    assert with_grad == expected
    # Exactly aligners (both modalities, key/value, positional embeddings), connections, LoRA.
    groups = model.parameter_groups()
    assert {k.split(".")[1] for k in groups["aligners"]} == {"camera", "lidar"}
    assert any(k.endswith("key_pos") for k in groups["aligners"])
    assert set(groups["connections"]) == {"connections.weight"}
    assert {int(k.split(".")[1]) for k in groups["lora"]} == {first, first + 1}
    assert trainable == set().union(*groups.values())
    # Non-zero gradients where the loss depends on the tensor.
    for name, p in groups["aligners"].items():
        assert p.grad.abs().sum() > 0, name
    w_grad = groups["connections"]["connections.weight"].grad
    assert (w_grad[first:] != 0).all() and (w_grad[:first] == 0).all()
    for name, p in groups["lora"].items():
        if name.endswith("lora_B"):  # A's gradient is 0 while B is still its zero init
            assert p.grad.abs().sum() > 0, name
    # Nothing of the LLM itself trains.
    llm_params = {n for n, p in llm.named_parameters() if p.grad is not None}
    assert all("lora_" in n for n in llm_params)


def test_ablation_switches_remove_their_parameters(llama):
    llm, tok = llama
    model = MPnPModel(llm, tok)
    model.create_state(
        "s",
        [ModalitySpec("camera", 8, 3)],
        ConnectionConfig(
            num_blocks=2,
            lora=False,
            train_connections=False,
            positional_embeddings=False,
            aligner_kind="linear",
        ),
    )
    groups = model.parameter_groups()
    assert groups["lora"] == {} and groups["connections"] == {}
    assert not any("pos" in k for k in groups["aligners"])
    assert sorted(groups["aligners"]) == [
        "aligners.camera.key.net.0.bias",
        "aligners.camera.key.net.0.weight",
        "aligners.camera.value.net.0.bias",
        "aligners.camera.value.net.0.weight",
    ]
