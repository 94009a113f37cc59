"""The real ``mpnp`` backend on tiny parts (random tiny LLM, tiny encoders): the protocol's
behaviours — answering about frames, bounded adaptation phases, the swap, states through the
store, encoders loaded on demand — and the whole daemon around it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_daemon_support import running_daemon, test_config, wait_for

from adapt.connectors.base import ConnectorConfig
from adapt.connectors.mpnp import MPnPConnector
from adapt.features import FeatureSet
from aligners.model import MPnPModel
from daemon.backend import BACKEND_METHODS, ModelBackend
from daemon.client import Client, DaemonError, SensorPublisher
from daemon.mpnp_backend import MPnPBackend, MPnPBackendConfig, context_of
from daemon.store import ModelStore
from encoders import create_encoder
from mpnp.tiny import tiny_llm
from scenes.sample import CAMERA_VIEWS, Frame, QAItem

TINY = {
    "camera-vit": dict(image_height=16, image_width=32, patch_size=8, embed_dim=32, depth=2,
                       num_heads=2, cls_blocks=2),
    "lidar-rangevit": dict(beams=8, range_width=64, stem_channels=4, stem_hidden=8,
                           stem_context_blocks=1, patch_stride=(4, 16), embed_dim=32, depth=2,
                           num_heads=2, bands=4, token_blocks=2),
}


def _frame(seed: int, frame_id: str | None = None) -> Frame:
    rng = np.random.default_rng(seed)
    cameras = {v: rng.integers(0, 256, (16, 32, 3), dtype=np.uint8) for v in CAMERA_VIEWS}
    az, dist = rng.uniform(-np.pi, np.pi, 200), rng.uniform(2, 30, 200)
    lidar = np.stack([dist * np.cos(az), dist * np.sin(az), rng.uniform(-1.8, 1.0, 200),
                      rng.uniform(0, 1, 200)], axis=1).astype(np.float32)
    return Frame(frame_id or f"f{seed}", "s", float(seed), 1.0, cameras, lidar)


def _featureset(encoders, seeds, prefix: str) -> FeatureSet:
    frames = [_frame(s, f"{prefix}{s}") for s in seeds]
    items = [QAItem(f.frame_id, "is there a car?", "yes" if i % 2 else "no", "exist", 0)
             for i, f in enumerate(frames)]
    tokens = {m: {f.frame_id: e.encode([f])[0] for f in frames} for m, e in encoders.items()}
    return FeatureSet(items, tokens)


@pytest.fixture
def backend():
    torch.manual_seed(0)
    llm, tok = tiny_llm("llama", num_layers=4)
    encoders = {"camera": create_encoder("camera-vit", **TINY["camera-vit"]).freeze(),
                "lidar": create_encoder("lidar-rangevit", **TINY["lidar-rangevit"]).freeze()}
    model = MPnPModel(llm, tok)
    from daemon.mpnp_backend import _spec

    specs = {m: _spec(e) for m, e in encoders.items()}
    serving = MPnPConnector(llm, tok, [specs["camera"]], ConnectorConfig(num_blocks=2),
                            model=model, state_name="day")
    splits = SimpleNamespace(**{f"{c}_{s}": _featureset(encoders, range(k, k + 6), f"{c}{s}")
                                for k, (c, s) in enumerate([(c, s) for c in ("day", "night")
                                                            for s in ("train", "val")])})
    prepared = SimpleNamespace(encoders=encoders, record={}, data_dir=None)
    config = MPnPBackendConfig(val_questions=4, eval_chunk=2, max_new_tokens=2, micro_batch=1)
    return MPnPBackend(config, model, serving, prepared, splits)


def test_backend_implements_the_protocol(backend):
    assert isinstance(backend, ModelBackend)
    assert all(callable(getattr(backend, name)) for name in BACKEND_METHODS)
    assert context_of(frozenset({"lidar"})) == "night" and context_of(["camera"]) == "day"


def test_serving_stops_on_closed_vocabulary_answers(backend):
    from mpnp.answers import ANSWER_VOCAB

    assert backend.serving.config.stop_at_answers == ANSWER_VOCAB
    backend.start_adaptation(frozenset({"lidar"}), n_blocks=3, steps=1, batch_size=1)
    assert backend._run.connector.config.stop_at_answers == ANSWER_VOCAB  # validated alike
    assert MPnPBackendConfig(answer_vocabulary="").answer_vocabulary == ""
    with pytest.raises(ValueError, match="answer_vocabulary"):
        MPnPBackendConfig(answer_vocabulary="vqa-v2")


def test_answers_about_frames_with_the_serving_state(backend):
    answers = backend.answer(["is there a car?"] * 2, [_frame(1), _frame(2)],
                             frozenset({"camera"}))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="one frame per question"):
        backend.answer(["q"], None, frozenset({"camera"}))


def test_adaptation_runs_in_bounded_phases_and_swaps_atomically(backend):
    serving_before = backend.serving
    tensors_before = {k: v.clone() for k, v in
                      backend.model.state_tensors(serving_before.state_name).items()}
    backend.start_adaptation(frozenset({"lidar"}), n_blocks=3, steps=2, batch_size=2)
    phases = []
    while (progress := backend.adaptation_step()) is not None:
        phases.append(progress.phase)
        # the serving state is untouched while the candidate trains
        assert backend.serving is serving_before
    assert phases[0] == "baseline" and phases[-1] == "validate"
    assert phases.count("train") == 4  # 2 steps x 2 samples, one sample per call
    assert phases.count("baseline") == 2 and phases.count("validate") == 2  # 4 val / chunk 2
    for key, value in backend.model.state_tensors(serving_before.state_name).items():
        assert torch.equal(value, tensors_before[key]), key
    adapted = backend.validation_accuracy("adapted")
    assert 0.0 <= adapted <= 1.0 and 0.0 <= backend.validation_accuracy("serving") <= 1.0
    backend.commit_adapted()
    assert backend.serving.modality_names == ["lidar"]
    assert backend.serving.config.num_blocks == 3
    assert serving_before.state_name not in backend.model.states
    report = backend.last_report
    assert report["committed"] and report["steps"] == 2 and report["samples"] == 4
    assert report["flops"] > 0
    assert report["micro_steps"] == 4 and 1 <= report["flop_counted_micro_steps"] <= 4
    assert backend.answer(["q"], [_frame(3)], frozenset({"lidar"}))


def test_flops_are_counted_once_per_step_shape(backend):
    """Counting costs a micro-step's time again on a CPU: repeats reuse the count, and
    the total still equals what counting every step gives."""
    from mpnp.measure import count_flops

    backend.start_adaptation(frozenset({"lidar"}), n_blocks=3, steps=6, batch_size=2)
    run = backend._run
    while run.phase != "validate":
        backend.adaptation_step()
    assert run.micro_steps == 12 and 1 <= len(run.flops_by_signature) < 12
    # every step shape seen, counted afresh now, gives the same count
    for key, flops in run.flops_by_signature.items():
        index = next(i for i in range(len(run.train))
                     if run.connector.step_signature(run.train.batch([i]))[:2] == key[:2])
        batch = run.train.batch([index])
        if run.connector.step_signature(batch) != key:
            continue  # a cache-miss shape cannot be replayed as a miss
        with count_flops() as again:
            (run.connector.loss(batch) * 0.5).backward()
        assert again.total == flops


def test_replan_shortens_and_discard_keeps_serving(backend):
    before = backend.serving
    backend.start_adaptation(frozenset({"camera", "lidar"}), 2, 10, 1)
    backend.adaptation_step()
    backend.adaptation_step()  # baseline done (2 chunks)
    backend.adaptation_step()  # one training step
    backend.set_total_steps(1)
    assert backend.adaptation_step().phase == "train"  # no step left: on to validation
    assert backend.adaptation_step().phase == "validate"
    backend.discard_adapted()
    assert backend.serving is before and len(backend.model.states) == 1


def test_state_round_trip_through_the_store_and_encoders_on_demand(backend, tmp_path):
    store = ModelStore(tmp_path / "store", memory_budget_bytes=10 << 20)
    backend.attach_store(store)
    assert store.cached() == ["encoder-camera"]  # LiDAR is not loaded until connected
    frame = _frame(5)
    before = backend.answer(["is there a car?"], [frame], frozenset({"camera"}))
    entry = store.save_state(backend.save_state, {"modalities": ["camera"]})
    store.evict()
    backend.load_state(store.path(store.verify(entry.name)))
    assert store.cached() == ["encoder-camera"]
    assert backend.answer(["is there a car?"], [frame], frozenset({"camera"})) == before
    assert backend.serving.config.stop_at_answers == backend.config.answer_vocabulary_answers
    assert backend.reconnects[-1]["seconds"] < 5
    backend.start_adaptation(frozenset({"lidar"}), 2, 1, 1)
    assert "encoder-lidar" in store.cached()  # Reconnect loaded it from the store
    backend.discard_adapted()
    store.close()


def test_daemon_serves_and_adapts_with_the_real_backend(backend, tmp_path):
    config = test_config(tmp_path, adaptation={"auto": False, "target_steps": 2, "batch_size": 1,
                                               "min_steps": 1})
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"], timeout_s=30) as client, \
            SensorPublisher(daemon.endpoints["ingest"]) as publisher:
        frame = _frame(7, "live-7")
        wait_for(lambda: publisher.send_camera(frame) and publisher.send_lidar(frame)
                 and daemon.metrics.frames_in.total() >= 2)
        reply = client.ask("is there a car?", "live-7")
        assert reply["modalities"] == ["camera"] and reply["frame_id"] == "live-7"
        client.adapt("start", ["lidar"], force_commit=True)
        wait_for(lambda: client.status()["serving"]["modalities"] == ["lidar"], timeout=60)
        status = client.status()
        assert status["last_adaptation"]["outcome"] in ("better", "forced")
        assert status["adaptation_cost"]["flops"] > 0
        assert client.ask("is there a car?", "live-7")["modalities"] == ["lidar"]
        kinds = {e["kind"] for e in client.list_store()["entries"]}
        assert kinds == {"encoder", "state"}


def test_corrupt_encoder_in_the_store_fails_the_switch_but_serving_goes_on(backend, tmp_path,
                                                                           caplog):
    config = test_config(tmp_path, adaptation={"target_steps": 2, "batch_size": 1,
                                               "min_steps": 1})
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"], timeout_s=30) as client, \
            SensorPublisher(daemon.endpoints["ingest"]) as publisher:
        store = daemon.engine.store
        store.path(store.get("encoder-lidar")).write_bytes(b"not an encoder")
        store.evict()
        client.set_modality("forced", ["lidar"])
        result = wait_for(lambda: client.status()["last_adaptation"], timeout=30)
        assert result["outcome"] == "failed"
        assert "encoder-lidar" in result["error"] and "corrupt" in result["error"]
        frame = _frame(8, "live-8")
        wait_for(lambda: publisher.send_camera(frame) and daemon.metrics.frames_in.total() >= 1)
        reply = client.ask("is there a car?", "live-8")
        assert reply["modalities"] == ["camera"]
        assert client.status()["serving"]["modalities"] == ["camera"]


def test_answers_are_never_cut_inside_a_vocabulary_answer(backend):
    """``max_new_tokens=2`` used to end ``traffic cone`` after its first tokens: the decoding
    budget now covers the longest closed-vocabulary answer plus its stop token."""
    from mpnp.answers import ANSWER_VOCAB
    from mpnp.generation import _ids

    tok = backend.model.tokenizer
    longest = max(len(_ids(tok, " " + a)) for a in ANSWER_VOCAB)
    assert backend.config.max_new_tokens == 2
    assert backend.serving.config.max_new_tokens == longest + 1
    backend.start_adaptation(frozenset({"lidar"}), n_blocks=3, steps=1, batch_size=1)
    assert backend._run.connector.config.max_new_tokens == longest + 1


def test_frames_the_encoder_cannot_take_are_dropped_at_ingest(backend, tmp_path):
    """A camera size the protocol allows but the encoder cannot take used to become the latest
    frame and fail every question (LiDAR ones too) until a good frame came."""
    config = test_config(tmp_path, adaptation={"auto": False},
                         limits={"max_question_tokens": 64})
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"], timeout_s=30) as client, \
            SensorPublisher(daemon.endpoints["ingest"]) as publisher:
        good = _frame(3, "good")
        wait_for(lambda: publisher.send_camera(good) and publisher.send_lidar(good)
                 and daemon.metrics.frames_in.total() >= 2)
        odd = Frame("odd", "s", 4.0, 1.0,
                    {v: np.zeros((24, 40, 3), np.uint8) for v in CAMERA_VIEWS}, good.lidar)
        assert publisher.send_camera(odd)
        wait_for(lambda: daemon.metrics.frames_dropped.value(reason="unsupported_frame") == 1)
        assert client.ask("is there a car?")["frame_id"] == "good"  # the last good frame
        with pytest.raises(DaemonError) as info:  # 300 tokens (char tokenizer) > 64
            client.ask("a" * 300)
        assert info.value.code == "too_large" and "tokens" in info.value.message
        assert backend.count_tokens("a" * 300) == 300
        assert client.ask("is there a car?", "good")["frame_id"] == "good"
