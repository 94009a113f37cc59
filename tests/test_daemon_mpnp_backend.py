"""The real ``mpnp`` backend on tiny parts (random tiny LLM, tiny encoders): the protocol's
behaviours — answering about frames, bounded adaptation phases, the swap, states through the
store, encoders loaded on demand — and the whole daemon around it."""

from __future__ import annotations

import time
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
from daemon.client import Client, DaemonError, EventSubscriber, SensorPublisher
from daemon.encoder_pool import encoder_spec
from daemon.mpnp_backend import MPnPBackend, MPnPBackendConfig
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
    return Frame.from_rig(frame_id or f"f{seed}", "s", float(seed), 1.0, cameras, lidar)


def _featureset(encoders, seeds, prefix: str) -> FeatureSet:
    frames = [_frame(s, f"{prefix}{s}") for s in seeds]
    items = [QAItem(f.frame_id, "is there a car?", "yes" if i % 2 else "no", "exist", 0)
             for i, f in enumerate(frames)]
    tokens = {m: {f.frame_id: e.encode([f])[0] for f in frames} for m, e in encoders.items()}
    return FeatureSet(items, tokens)


def make_backend(**options) -> MPnPBackend:
    """The real backend on tiny parts; the same ``options`` build the same parts."""
    torch.manual_seed(0)
    llm, tok = tiny_llm("llama", num_layers=4)
    encoders = {"camera": create_encoder("camera-vit", **TINY["camera-vit"]).freeze(),
                "lidar": create_encoder("lidar-rangevit", **TINY["lidar-rangevit"]).freeze()}
    model = MPnPModel(llm, tok)
    specs = {m: encoder_spec(e) for m, e in encoders.items()}
    serving = MPnPConnector(llm, tok, [specs["camera"]], ConnectorConfig(num_blocks=2),
                            model=model, state_name="day")
    splits = SimpleNamespace(**{f"{c}_{s}": _featureset(encoders, range(k, k + 6), f"{c}{s}")
                                for k, (c, s) in enumerate([(c, s) for c in ("day", "night")
                                                            for s in ("train", "val")])})
    prepared = SimpleNamespace(encoders=encoders, record={}, data_dir=None)
    config = MPnPBackendConfig(**({"val_questions": 4, "eval_chunk": 2, "max_new_tokens": 2,
                                   "micro_batch": 1} | options))
    return MPnPBackend(config, model, serving, prepared, splits)


@pytest.fixture
def backend():
    return make_backend()


@pytest.mark.parametrize("micro_batch", [1, 2])
def test_trainer_fit_and_the_daemon_run_the_same_training_loop(micro_batch):
    """One engine: the same connector, data, seed and N trained through ``Trainer.fit`` (the
    CLI's ``runtime_adapt``) and through the daemon's adaptation path give identical tensors
    and equal counted FLOPs."""
    from adapt.algorithm import runtime_adapt

    steps, batch = 6, 2  # 6 night training questions: 3 steps an epoch, 2 epochs
    daemon_side = make_backend(micro_batch=micro_batch, seed=7)
    daemon_side.start_adaptation(frozenset({"lidar"}), n_blocks=3, steps=steps, batch_size=batch)
    phases = []
    while (progress := daemon_side.adaptation_step()) is not None:
        phases.append(progress.phase)
    assert phases.count("train") == steps * batch // micro_batch
    stepper = daemon_side._job.stepper
    daemon_state = daemon_side.model.state_tensors(stepper.connector.state_name)

    cli_side = make_backend(micro_batch=micro_batch, seed=7)
    config = cli_side.train_config(batch).with_rates()
    config.epochs = 2
    specs = {m: cli_side.encoders.spec(m) for m in ("camera", "lidar")}
    fork, report, _ = runtime_adapt(cli_side.serving, "switch", specs,
                                    cli_side.splits.night_train, None, config, num_blocks=3,
                                    progress=False)
    cli_state = cli_side.model.state_tensors(fork.state_name)

    assert report.steps == stepper.steps == steps and report.samples == stepper.samples
    assert daemon_state.keys() == cli_state.keys()
    trained = [k for k in cli_state
               if not torch.equal(cli_state[k], cli_side.model.state_tensors("day").get(k,
                                                                                    cli_state[k]))]
    assert trained, "nothing trained: the comparison would be vacuous"
    for key in cli_state:
        assert torch.equal(daemon_state[key], cli_state[key]), key
    assert report.flops == stepper.flops > 0


def test_adapting_in_the_backend_leaves_the_global_rng_alone(backend, tmp_path):
    """A serving process's global torch RNG is not reseeded or advanced by building,
    stepping or committing an adaptation (LoRA dropout is on, so training does draw), nor by
    saving and restoring a state."""
    assert backend.serving.model.states["day"].config.lora_dropout > 0
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(before)
    backend.start_adaptation(frozenset({"camera", "lidar"}), n_blocks=3, steps=2, batch_size=2)
    while backend.adaptation_step() is not None:
        pass
    backend.commit_adapted()
    backend.answer(["is there a car?"], [_frame(3)], frozenset({"camera", "lidar"}))
    backend.save_state(tmp_path / "state.safetensors")
    backend.load_state(tmp_path / "state.safetensors")
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected)


def test_backend_implements_the_protocol(backend):
    assert isinstance(backend, ModelBackend)
    assert all(callable(getattr(backend, name)) for name in BACKEND_METHODS)
    # the default light-level policy: its night set trains on night data, its day set on day
    assert backend.context_of(frozenset({"lidar"})) == "night"
    assert backend.context_of(frozenset({"camera"})) == "day"


def test_the_context_policy_not_the_modality_name_picks_the_data(backend):
    from policies.context import LightLevelPolicy, ModalitySelector

    selector = ModalitySelector(LightLevelPolicy(night_modalities=("camera",),
                                                 day_modalities=("lidar",)))
    backend.use_data_context(selector.data_context)
    assert backend.context_of(frozenset({"camera"})) == "night"
    assert backend.context_of(frozenset({"lidar"})) == "day"
    backend.use_data_context(lambda modalities: None)  # no view: the configured default
    assert backend.context_of(frozenset({"lidar"})) == backend.config.context == "day"
    backend.use_data_context(lambda modalities: "dusk")
    with pytest.raises(ValueError, match="no 'dusk' training data"):
        backend.start_adaptation(frozenset({"lidar"}), n_blocks=2, steps=1, batch_size=1)
    assert list(backend.model.states) == ["day"]  # no candidate was left behind


def test_serving_stops_on_closed_vocabulary_answers(backend):
    from mpnp.answers import ANSWER_VOCAB

    assert backend.serving.config.stop_at_answers == ANSWER_VOCAB
    backend.start_adaptation(frozenset({"lidar"}), n_blocks=3, steps=1, batch_size=1)
    assert backend._job.stepper.connector.config.stop_at_answers == ANSWER_VOCAB  # validated alike
    assert MPnPBackendConfig(answer_vocabulary="").answer_vocabulary == ""
    with pytest.raises(ValueError, match="answer_vocabulary"):
        MPnPBackendConfig(answer_vocabulary="vqa-v2")


def test_adaptation_trains_with_the_projects_autocast_unless_configured(backend):
    from adapt.prepare import DEFAULT_AUTOCAST

    assert backend.train_config(4).autocast == DEFAULT_AUTOCAST  # as Table 1 trains
    backend.config.autocast = "bfloat16"
    assert backend.train_config(4).autocast == "bfloat16"
    with pytest.raises(ValueError, match="autocast"):
        MPnPBackendConfig(autocast="fp8")


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
    job = backend._job
    while job.phase != "validate":
        backend.adaptation_step()
    run = job.stepper
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
            SensorPublisher(daemon.endpoints["ingest"]) as publisher, \
            EventSubscriber(daemon.endpoints["events"]) as events:
        time.sleep(0.2)  # let the subscription reach the daemon
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
        # the engine reads what is serving from the backend, and the switch event still
        # names the set it switched from
        assert daemon.engine.serving == backend.serving_modalities() == {"lidar"}
        switched = None
        while switched is None and (event := events.receive(5.0)) is not None:
            if event[0].value == "modality.switched":
                switched = event[1]
        assert switched is not None
        assert switched["previous"] == ["camera"] and switched["modalities"] == ["lidar"]
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
    assert backend._job.stepper.connector.config.max_new_tokens == longest + 1


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
        odd = Frame.from_rig("odd", "s", 4.0, 1.0,
                             {v: np.zeros((24, 40, 3), np.uint8) for v in CAMERA_VIEWS},
                             good.lidar)
        assert publisher.send_camera(odd)
        wait_for(lambda: daemon.metrics.frames_dropped.value(reason="unsupported_frame") == 1)
        assert client.ask("is there a car?")["frame_id"] == "good"  # the last good frame
        with pytest.raises(DaemonError) as info:  # 300 tokens (char tokenizer) > 64
            client.ask("a" * 300)
        assert info.value.code == "too_large" and "tokens" in info.value.message
        assert backend.count_tokens("a" * 300) == 300
        assert client.ask("is there a car?", "good")["frame_id"] == "good"
