"""The daemon's compose path under the real ``mpnp`` backend on tiny parts (random tiny LLM,
tiny encoders): two real single-modality states (the camera state it starts with, a LiDAR
state adapted from it) are composed by :mod:`aligners.compose`, validated by the same bounded
job as an adaptation, served, and, in a live daemon, stored with their provenance. Also
measures the time to compose in the daemon (printed; see the report)."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from test_daemon_mpnp_backend import _frame, make_backend
from test_daemon_support import running_daemon, test_config, wait_for

from aligners.compose import compose_states
from aligners.state import read_state_file, snapshot_state
from daemon.backend import ComposeError, ComposeInput, ComposingBackend
from daemon.client import Client, SensorPublisher
from daemon.store import ModelStore

log = logging.getLogger(__name__)
BOTH = frozenset({"camera", "lidar"})


def _adapt(backend, modalities: frozenset[str], n_blocks: int = 3) -> None:
    backend.start_adaptation(modalities, n_blocks=n_blocks, steps=2, batch_size=2)
    while backend.adaptation_step() is not None:
        pass
    backend.commit_adapted()


def _single_modality_states(backend, directory) -> list[ComposeInput]:
    """The camera state the backend serves (N=2) and a LiDAR state adapted from it (N=3),
    saved as the daemon's store would; the backend serves the LiDAR one afterwards."""
    directory.mkdir(exist_ok=True)
    backend.save_state(directory / "camera.safetensors")
    _adapt(backend, frozenset({"lidar"}))
    backend.save_state(directory / "lidar.safetensors")
    return [ComposeInput("camera", 1, ("camera",), directory / "camera.safetensors"),
            ComposeInput("lidar", 2, ("lidar",), directory / "lidar.safetensors")]


@pytest.mark.parametrize("method, max_evals, used", [
    ("naive", 3, "naive"),
    ("auto", 3, "damc"),  # 3 evaluations x 2 held-out questions <= 2 x 4 gate questions
    ("auto", 5, "naive"),  # 5 x 2 > 2 x 4: the search would cost more than the gate
])
def test_the_backend_composes_real_states_and_serves_the_composed_one(method, max_evals, used,
                                                                      tmp_path):
    backend = make_backend()
    assert isinstance(backend, ComposingBackend)
    inputs = _single_modality_states(backend, tmp_path)
    lidar_serving = backend.serving
    info = backend.compose_candidate(inputs, BOTH, method, max_evals=max_evals)
    assert backend.serving is lidar_serving  # nothing served until the gate says so
    phases = []
    while (progress := backend.adaptation_step()) is not None:
        phases.append(progress.phase)
        assert progress.step == 0 and progress.samples == 0  # no training
    # the gate's validation in bounded chunks (4 questions, chunks of 2), nothing trained
    assert phases == ["baseline", "baseline", "train", "validate", "validate"]
    assert 0.0 <= backend.validation_accuracy("adapted") <= 1.0
    assert info["num_blocks"] == 3 and info["blocks"] == "union"
    assert info["modality_from"] == {"camera": 0, "lidar": 1}
    assert info["method"] == used
    if used == "naive":
        assert info["lambdas"] is None and info["search"] is None
    else:
        assert len(info["lambdas"]) == 2
        search = info["search"]
        assert 1 <= search["evaluations"] <= 3 and search["on"] == "held-out"
        assert search["questions"] == 2 * search["evaluations"]
    backend.commit_adapted()
    assert backend.serving_modalities() == BOTH
    assert backend.last_report["composition"]["method"] == info["method"]
    assert backend.last_report["steps"] == 0 and backend.last_report["flops"] == 0
    # what serves is exactly aligners.compose's composition of the two stored states
    expected = compose_states([read_state_file(i.path) for i in inputs], info["method"],
                              lambdas=info["lambdas"])
    served = snapshot_state(backend.model, backend.serving.state_name)
    assert served.tensors.keys() == expected.tensors.keys()
    for key, value in expected.tensors.items():
        assert torch.equal(served.tensors[key], value), key
    assert sorted(served.connected) == ["camera", "lidar"]
    assert len(backend.answer(["is there a car?"], [_frame(9)], BOTH)) == 1
    assert set(backend.model.states) == {backend.serving.state_name}  # nothing left behind
    print(f"\n[compose timing, tiny model] {method}->{info['method']}: compose "
          f"{info['compose_s'] * 1000:.1f} ms, read {info['read_s'] * 1000:.1f} ms, install "
          f"{info['install_s'] * 1000:.1f} ms")


def test_states_of_another_llm_are_refused_and_nothing_changes(tmp_path):
    backend = make_backend()
    inputs = _single_modality_states(backend, tmp_path)
    other = make_backend()
    with torch.no_grad():  # the same architecture, other weights: another LLM
        other.model.llm.get_input_embeddings().weight.mul_(-1.5)
    other.save_state(tmp_path / "other-camera.safetensors")
    foreign = ComposeInput("other", 3, ("camera",), tmp_path / "other-camera.safetensors")
    serving, states = backend.serving, set(backend.model.states)
    with pytest.raises(ComposeError, match="another LLM"):
        backend.compose_candidate([foreign, inputs[1]], BOTH, "naive", max_evals=2)
    with pytest.raises(ComposeError, match="unknown composition method"):
        backend.compose_candidate(inputs, BOTH, "mean", max_evals=2)
    assert backend.serving is serving and set(backend.model.states) == states
    assert backend.adaptation_step() is None  # no candidate


def test_the_daemon_composes_real_states_and_serves_the_composed_one(tmp_path):
    backend = make_backend()
    config = test_config(tmp_path, adaptation={"auto": False, "compose": "serve",
                                               "compose_method": "naive", "target_steps": 2,
                                               "batch_size": 1, "min_steps": 1})
    store = ModelStore(config.store.directory)
    store.save_state(backend.save_state, {"modalities": ["camera"]})
    _adapt(backend, frozenset({"lidar"}))
    store.save_state(backend.save_state, {"modalities": ["lidar"]})
    store.close()
    started = time.monotonic()
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"], timeout_s=30) as client, \
            SensorPublisher(daemon.endpoints["ingest"]) as publisher:
        assert client.status()["serving"]["modalities"] == ["lidar"]  # resumed
        reply = client.compose(["camera", "lidar"])
        assert reply["started"] and reply["composition"]["method"] == "naive"
        status = wait_for(lambda: (s := client.status())["last_composition"] and s, timeout=30)
        last = status["last_composition"]
        served_in = time.monotonic() - started
        if not last["committed"]:  # random tiny weights: the gate may well refuse it
            assert last["outcome"] == "not_better"
            assert last["adapted_accuracy"] <= last["serving_accuracy"]
            assert client.status()["serving"]["modalities"] == ["lidar"]
            client.compose(["camera", "lidar"], force_commit=True)
            status = wait_for(lambda: (s := client.status())["serving"]["modalities"]
                              == ["camera", "lidar"] and s, timeout=30)
            assert status["last_composition"]["outcome"] in ("forced", "better")
        else:
            status = wait_for(lambda: (s := client.status())["serving"]["modalities"]
                              == ["camera", "lidar"] and s, timeout=30)
        serving = status["serving"]
        assert serving["source"] == "composition"
        composition = serving["composition"]
        assert [i["modalities"] for i in composition["inputs"]] == [["camera"], ["lidar"]]
        assert composition["method"] == "naive" and composition["training_flops"] == 0
        assert backend.serving_modalities() == BOTH
        frame = _frame(11, "live-11")
        wait_for(lambda: publisher.send_camera(frame) and publisher.send_lidar(frame)
                 and daemon.metrics.frames_in.total() >= 2)
        reply = client.ask("is there a car?", "live-11")
        assert reply["modalities"] == ["camera", "lidar"]
        assert reply["state_generation"] == serving["generation"]
        print(f"\n[compose timing, tiny model, daemon] compose "
              f"{composition['compose_s'] * 1000:.1f} ms, whole compose call "
              f"{composition['compose_wall_s'] * 1000:.1f} ms, to the gate's decision "
              f"{last['time_to_decision_s'] * 1000:.0f} ms; daemon start to decision "
              f"{served_in:.2f} s ({last['outcome']})")


def test_fine_tuning_starts_from_the_composed_state(tmp_path):
    """After a composed state is served, an adaptation of the same set forks it (rank-Σr
    LoRA, the composed aligners) and trains from there, as ``compose = "finetune"`` does."""
    backend = make_backend()
    inputs = _single_modality_states(backend, tmp_path)
    backend.compose_candidate(inputs, BOTH, "naive", max_evals=1)
    while backend.adaptation_step() is not None:
        pass
    backend.commit_adapted()
    composed = snapshot_state(backend.model, backend.serving.state_name)
    rank = composed.config["connection"]["lora_r"]
    assert rank == 2 * read_state_file(inputs[0].path).config["connection"]["lora_r"]
    backend.start_adaptation(BOTH, n_blocks=3, steps=2, batch_size=2)
    start = snapshot_state(backend.model, backend._job.stepper.connector.state_name)
    assert start.tensors.keys() == composed.tensors.keys()
    assert all(torch.equal(start.tensors[k], v) for k, v in composed.tensors.items())
    while backend.adaptation_step() is not None:
        pass
    backend.commit_adapted()
    tuned = snapshot_state(backend.model, backend.serving.state_name)
    assert tuned.config["connection"]["lora_r"] == rank
    assert any(not torch.equal(tuned.tensors[k], v) for k, v in composed.tensors.items())
    assert backend.last_report["steps"] == 2 and backend.last_report["composition"] is None
    assert len(backend.answer(["is there a car?"], [_frame(12)], BOTH)) == 1
