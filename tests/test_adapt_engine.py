"""The training engine's own guarantees: its private random stream, bounded micro-steps,
a re-plan that falls inside an optimizer step, and bfloat16 autocast."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_adapt_training import feature_set, make

from adapt.engine import AdaptationStepper, PrivateRNG
from adapt.precision import autocast_context, bf16_supported, precision_label
from adapt.trainer import TrainConfig
from mpnp.tiny import tiny_llm

RATES = {"aligners": 1e-2, "lora": 1e-2, "connections": 1e-1}


def test_private_rng_is_seeded_and_leaves_the_global_stream_alone():
    torch.manual_seed(99)
    before = torch.get_rng_state()
    a, b = PrivateRNG(5), PrivateRNG(5)
    with a.active():
        first = torch.rand(4)
    with a.active():
        second = torch.rand(4)  # the stream goes on where it stopped
    with b.active():
        again = torch.rand(8)
    assert torch.equal(torch.cat([first, second]), again)
    assert torch.equal(torch.get_rng_state(), before)


def test_micro_steps_accumulate_into_one_optimizer_step_per_batch():
    data = feature_set()  # 18 questions
    conn = make("mpnp", tiny_llm("llama", num_layers=4))
    stepper = AdaptationStepper(conn, TrainConfig(epochs=1, batch_size=4, micro_batch=3,
                                                  learning_rates=RATES), data)
    assert stepper.total_steps == 5  # ceil(18 / 4)
    units = []
    while not stepper.done:
        units.append(stepper.micro_step())
    # each batch of 4 is a micro-batch of 3 then 1; the epoch's last batch holds 2
    assert [u.samples for u in units] == [3, 1] * 4 + [2]
    assert [u.stepped for u in units] == [False, True] * 4 + [True]
    assert units[-1].epoch_end and stepper.epoch == 1 and stepper.samples == 18
    assert stepper.micro_steps == 9 and stepper.flops > 0


def test_a_replan_inside_an_optimizer_step_drops_its_micro_batches():
    data = feature_set()
    conn = make("mpnp", tiny_llm("llama", num_layers=4))
    stepper = AdaptationStepper(conn, TrainConfig(epochs=1, batch_size=4, micro_batch=1,
                                                  learning_rates=RATES), data)
    start = {n: p.detach().clone() for n, p in conn.named_parameters() if p.requires_grad}
    stepper.micro_step()
    stepper.micro_step()
    stepper.set_total_steps(0)  # stop now: the half-accumulated step never happens
    assert stepper.done and stepper.steps == 0
    assert all(torch.equal(p, start[n]) for n, p in conn.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in stepper.params)


def _trained(autocast: str, data) -> tuple[dict[str, torch.Tensor], list[float]]:
    torch.manual_seed(0)
    conn = make("mpnp", tiny_llm("llama", num_layers=4))
    stepper = AdaptationStepper(conn, TrainConfig(epochs=2, batch_size=6, learning_rates=RATES,
                                                  autocast=autocast), data)
    losses = []
    while not stepper.done:
        unit = stepper.micro_step()
        if unit.stepped:
            losses.append(unit.step_loss)
    tensors = {n: p.detach().clone() for n, p in conn.named_parameters() if p.requires_grad}
    return tensors, losses


def test_bfloat16_autocast_trains_float32_tensors_close_to_a_float32_run():
    data = feature_set()
    full, full_losses = _trained("off", data)
    half, half_losses = _trained("bfloat16", data)
    assert full.keys() == half.keys()
    assert all(t.dtype == torch.float32 for t in half.values())  # the trained state stays fp32
    # bfloat16 arithmetic changes the steps a little, never the run's course
    assert any(not torch.equal(full[n], half[n]) for n in full)
    for a, b in zip(full_losses, half_losses):
        assert abs(a - b) < 0.05 * abs(a) + 1e-3
    assert half_losses[-1] < half_losses[0]


def test_autocast_auto_follows_the_device_and_bad_modes_are_refused():
    cpu = torch.device("cpu")
    assert isinstance(autocast_context("off", cpu), contextlib.nullcontext)
    on = not isinstance(autocast_context("auto", cpu), contextlib.nullcontext)
    assert on == bf16_supported(cpu)
    with autocast_context("bfloat16", cpu):
        assert torch.is_autocast_enabled("cpu")
    assert precision_label("off", cpu) == "float32"
    assert precision_label("bfloat16", cpu) == "bfloat16 autocast"
    assert precision_label("auto", cpu) == ("bfloat16 autocast" if on else "float32")
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(autocast="fp8")
    with pytest.raises(ValueError, match="autocast"):
        autocast_context("half", cpu)
