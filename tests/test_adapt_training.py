"""Connectors and the trainer on a tiny random LLM: what trains, what it costs, what it saves."""

from __future__ import annotations

import pytest
import torch

from adapt.connectors import create_connector, list_connectors
from adapt.connectors.base import ConnectorConfig
from adapt.connectors.mpnp import lower_hidden_states
from adapt.evaluate import majority_baseline, score
from adapt.features import FeatureSet
from adapt.trainer import TrainConfig, Trainer, TrainingError
from aligners.config import ConnectionConfig, ModalitySpec
from mpnp.generation import encode_training
from mpnp.registry import UnknownNameError
from mpnp.tiny import tiny_llm
from scenes.sample import QAItem

CAM = ModalitySpec("camera", embed_dim=12, num_tokens=3)
LIDAR = ModalitySpec("lidar", embed_dim=8, num_tokens=2)
ANSWERS = ["yes", "no", "2", "car"]


def feature_set(n_frames: int = 6, per_frame: int = 3, seed: int = 0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    items, cam, lidar = [], {}, {}
    for f in range(n_frames):
        fid = f"f{f}"
        cam[fid] = torch.randn(CAM.num_tokens, CAM.embed_dim, generator=g)
        lidar[fid] = torch.randn(LIDAR.num_tokens, LIDAR.embed_dim, generator=g)
        for q in range(per_frame):
            items.append(QAItem(fid, f"is there a car {q}?", ANSWERS[(f + q) % 4],
                                ["exist", "count", "object"][q % 3], q % 2))
    return FeatureSet(items, {"camera": cam, "lidar": lidar})


@pytest.fixture
def model():
    return tiny_llm("llama", num_layers=4)


def make(kind: str, model, mods=(CAM,), **cfg):
    llm, tok = model
    return create_connector(kind, llm, tok, list(mods), ConnectorConfig(num_blocks=2, **cfg))


EXPECTED_GROUPS = {
    "mpnp": {"aligners", "connections", "lora"},
    "promptfuse": {"projection", "prompts"},
    "question_only": {"prompts"},
    "full_llm": {"projection", "llm"},
    "epalm": {"projection", "prompts"},
}


def test_registry_knows_every_method():
    assert set(list_connectors()) == set(EXPECTED_GROUPS)
    with pytest.raises(UnknownNameError, match="unknown connector .nope.; known: epalm"):
        create_connector("nope", None, None, [])


@pytest.mark.parametrize("kind", sorted(EXPECTED_GROUPS))
def test_each_method_trains_exactly_its_groups(kind, model):
    conn = make(kind, model)
    assert set(conn.parameter_groups()) == EXPECTED_GROUPS[kind]
    trainer = Trainer(conn, TrainConfig(epochs=1, batch_size=4, count_flops=True,
                                        learning_rates=dict.fromkeys(EXPECTED_GROUPS[kind], 1e-2)))
    before = {n: p.detach().clone() for n, p in conn.named_parameters()}
    data = feature_set()
    trainer.step(data.batch([0, 1, 2, 3]))
    changed = {n for n, p in conn.named_parameters() if not torch.equal(before[n], p)}
    trainable = set(trainer.trainable_names)
    assert changed and changed <= trainable, changed - trainable
    assert trainer.report.flops > 0 and trainer.report.samples == 4
    answers = conn.answer(["is there a car 0?", "x?"], data.batch([0, 1]).tokens)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_full_llm_trains_a_private_copy(model):
    llm, _ = model
    original = {n: p.detach().clone() for n, p in llm.named_parameters()}
    conn = make("full_llm", model)
    Trainer(conn, TrainConfig(epochs=1, learning_rates={"projection": 1e-2, "llm": 1e-2})).step(
        feature_set().batch([0, 1]))
    assert all(torch.equal(original[n], p) for n, p in llm.named_parameters())


def test_question_only_ignores_the_sensors(model):
    conn = make("question_only", model)
    data = feature_set()
    batch = data.batch([0, 1, 2])
    a = conn.loss(batch)
    batch.tokens = {m: torch.randn_like(t) * 100 for m, t in batch.tokens.items()}
    assert torch.equal(a, conn.loss(batch))


@pytest.mark.parametrize("kind", ["promptfuse", "epalm", "full_llm", "mpnp"])
def test_sensor_methods_depend_on_the_sensors(kind, model):
    conn = make(kind, model)
    conn.eval()  # no dropout
    batch = feature_set().batch([0, 1, 2])
    a = conn.loss(batch)
    batch.tokens = {m: torch.randn_like(t) * 10 for m, t in batch.tokens.items()}
    assert not torch.allclose(a, conn.loss(batch))


def test_answer_logits_only_gives_the_same_loss(model):
    data = feature_set()
    batch = data.batch([0, 4, 8])
    for kind in ("mpnp", "promptfuse"):
        conn = make(kind, model)
        conn.eval()
        full = conn.loss(batch).item()
        conn.config.answer_logits_only = False
        assert conn.loss(batch).item() == pytest.approx(full, rel=1e-5, abs=1e-6)
        conn.config.answer_logits_only = True


def test_hidden_state_cache_is_exact_and_hits_after_the_first_epoch(model):
    conn = make("mpnp", model)
    conn.model.state.config.lora_dropout = 0.0
    conn.train()
    for m in conn.modules():  # LoRA dropout off: compare cached and uncached exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = feature_set().batch([0, 1, 5])
    conn.cache_hidden = False
    ref = conn.loss(batch)
    conn.cache_hidden = True
    first = conn.loss(batch)  # fills the cache
    second = conn.loss(batch)  # replays it
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, ref, rtol=1e-5, atol=1e-6)
    assert conn.hidden_cache_misses == 3 and conn.hidden_cache_hits == 3
    # The replayed forward really skips the lower blocks: fewer FLOPs per step.
    from mpnp.measure import count_flops

    with count_flops() as cached:
        conn.loss(batch).backward()
    conn.cache_hidden = False
    with count_flops() as uncached:
        conn.loss(batch).backward()
    assert cached.total < uncached.total


def test_step_signature_fixes_the_flops_of_a_step(model):
    """The daemon counts FLOPs once per signature; that is exact only if equal signatures
    mean equal FLOPs and every FLOP-changing difference changes the signature."""
    from mpnp.measure import count_flops

    conn = make("mpnp", model)
    conn.train()
    data = feature_set()

    def step(index: int) -> tuple[tuple, int]:
        batch = data.batch([index])
        key = conn.step_signature(batch)
        with count_flops() as counted:
            conn.loss(batch).backward()
        return key, counted.total

    miss_key, miss = step(0)
    hit_key, hit = step(0)
    assert miss_key != hit_key and hit < miss  # the lower blocks ran only the first time
    other_frame = data.items.index(next(i for i in data.items
                                        if i.frame_id == "f4" and i.answer == "yes"))
    assert data.items[other_frame].question == data.items[0].question
    same_key, same = step(other_frame)  # other frame, same text and answer: same cost
    assert same_key == hit_key and same == hit
    conn.set_num_blocks(3)
    assert conn.step_signature(data.batch([0]))[-1] == 3  # N is part of the signature


def test_lower_hidden_states_match_the_model(model):
    llm, tok = model
    pb = encode_training(tok, ["a b?", "what is it?"], ["yes", "car"])
    hidden = lower_hidden_states(llm, pb, 2)
    out = llm(input_ids=pb.input_ids, attention_mask=pb.attention_mask,
              position_ids=pb.position_ids, output_hidden_states=True)
    real = pb.attention_mask.bool()
    torch.testing.assert_close(hidden[real], out.hidden_states[2][real])


def test_fit_learns_early_stops_and_restores_the_best(model):
    conn = make("mpnp", model, mods=(CAM, LIDAR))
    data = feature_set(n_frames=8, per_frame=2)
    cfg = TrainConfig(epochs=6, batch_size=4, patience=1, min_delta=0.0,
                      learning_rates={"aligners": 3e-3, "lora": 3e-3, "connections": 1e-1})
    report = Trainer(conn, cfg).fit(data, data, progress=False)
    assert report.losses[-1] < report.losses[0]
    assert 1 <= report.epochs_run <= 6 and report.samples == 16 * report.epochs_run
    assert report.flops > 0 and report.wall_s > 0 and report.samples_per_s > 0
    assert report.val_accuracy[report.best_epoch - 1] == max(report.val_accuracy)
    if report.stopped_early:
        assert report.epochs_run - report.best_epoch == 1


def test_fit_reports_every_optimizer_step_to_its_callback(model):
    conn = make("mpnp", model)
    seen: list[int] = []
    cfg = TrainConfig(epochs=2, batch_size=4, patience=0, count_flops=False,
                      learning_rates={"aligners": 3e-3, "lora": 3e-3, "connections": 1e-1})
    report = Trainer(conn, cfg).fit(feature_set(), None, progress=False, on_step=seen.append)
    assert seen == list(range(1, report.steps + 1)) and report.steps == 10  # 2 x ceil(18 / 4)


def test_checkpoint_resume_continues_where_it_stopped(model, tmp_path):
    data = feature_set()
    rates = {"aligners": 1e-3, "lora": 1e-3, "connections": 1e-1}
    torch.manual_seed(0)
    a = make("mpnp", model)
    Trainer(a, TrainConfig(epochs=2, batch_size=6, patience=0, learning_rates=rates)).fit(
        data, progress=False, checkpoint_dir=tmp_path / "a")
    # Same run interrupted after epoch 1, then resumed by a fresh trainer.
    llm, tok = tiny_llm("llama", num_layers=4)
    torch.manual_seed(0)
    b = make("mpnp", (llm, tok))
    cfg1 = TrainConfig(epochs=1, batch_size=6, patience=0, learning_rates=rates)
    Trainer(b, cfg1).fit(data, progress=False, checkpoint_dir=tmp_path / "b")
    cfg2 = TrainConfig(epochs=2, batch_size=6, patience=0, learning_rates=rates)
    resumed = Trainer(b, cfg2)
    report = resumed.fit(data, progress=False, checkpoint_dir=tmp_path / "b")
    assert report.epochs_run == 2 and report.steps == 6
    # the checkpoint carries the optimizer moments, data position and random stream:
    # the resumed run ends with exactly the tensors of the uninterrupted one
    trained_a = {n: p for n, p in a.named_parameters() if p.requires_grad}
    trained_b = {n: p for n, p in b.named_parameters() if p.requires_grad}
    assert trained_a.keys() == trained_b.keys()
    assert all(torch.equal(trained_a[n], trained_b[n]) for n in trained_a)
    # checkpoints are states on disk (aligners.state): a corrupt tensor file is refused
    assert (tmp_path / "b" / "state.json").is_file()
    (tmp_path / "b" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="unreadable"):
        Trainer(b, cfg2).fit(data, progress=False, checkpoint_dir=tmp_path / "b")


def test_missing_learning_rate_is_a_clear_error(model):
    with pytest.raises(ValueError, match="no learning rate for parameter groups"):
        Trainer(make("mpnp", model), TrainConfig(learning_rates={"aligners": 1e-3}))
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)


def test_scores_and_majority_baseline():
    items = [QAItem("f", "q1", "yes", "exist", 0), QAItem("f", "q2", "2", "count", 1),
             QAItem("f", "q3", "no", "exist", 1)]
    res = score(items, ["Yes.", "3", "no"])
    assert res.accuracy == pytest.approx(2 / 3)
    assert res.per_type == {"count": 0.0, "exist": 1.0}
    assert res.per_type_hop["exist/1"] == 1.0
    train = items + [QAItem("g", "q", "yes", "exist", 0)]
    assert majority_baseline(train, items).per_type["exist"] == pytest.approx(0.5)


@pytest.mark.parametrize("kind", sorted(EXPECTED_GROUPS))
def test_fork_then_switch_leaves_the_original_serving(kind, model):
    """Runtime Adapt (C -> L) trains a fork; the day connector's answers do not move."""
    day = make(kind, model)
    day.eval()
    batch = feature_set().batch([0, 1, 2])
    before = day.loss(batch).detach()
    night = day.fork("night")
    night.set_modalities([LIDAR])
    assert night.modality_names == ([] if kind == "question_only" else ["lidar"])
    groups = set(EXPECTED_GROUPS[kind])
    Trainer(night, TrainConfig(learning_rates=dict.fromkeys(groups, 1e-1))).step(batch)
    day.eval()
    torch.testing.assert_close(day.loss(batch).detach(), before, rtol=0, atol=0)
    if kind != "question_only":  # the camera no longer matters to the switched fork
        night.eval()
        a = night.loss(batch)
        batch.tokens["camera"] = torch.randn_like(batch.tokens["camera"]) * 10
        assert torch.equal(a, night.loss(batch))


def test_mpnp_add_keeps_the_trained_camera_aligner(model):
    day = make("mpnp", model)
    cam_before = {k: v.clone() for k, v in day.model.state_tensors("adapt").items()
                  if k.startswith("aligners.camera")}
    both = day.fork("both")
    both.set_modalities([CAM, LIDAR])
    both.set_num_blocks(3)
    state = both.model.states["both"]
    assert state.connected == ["camera", "lidar"] and state.config.num_blocks == 3
    theirs = both.model.state_tensors("both")
    assert all(torch.equal(theirs[k], v) for k, v in cam_before.items())
    assert day.model.states["adapt"].config.num_blocks == 2
    assert day.config.num_blocks == 2  # the fork's connector config is its own


def test_ablated_runtime_fork_uses_its_own_connection_config(model):
    from adapt.algorithm import runtime_adapt

    day = make("mpnp", model)
    data = feature_set()
    rates = {"aligners": 1e-3, "lora": 1e-3, "connections": 1e-1}
    fork, report, _ = runtime_adapt(
        day, "switch", {"camera": CAM, "lidar": LIDAR}, data, None,
        TrainConfig(epochs=1, batch_size=6, learning_rates=rates), num_blocks=3,
        connection_changes={"aligner_kind": "linear", "lora": False,
                            "train_connections": False}, progress=False)
    state = fork.model.states[fork.state_name]
    assert len(state.aligners["lidar"].key.net) == 1  # Linear aligner
    assert set(fork.parameter_groups()) == {"aligners"}
    assert state.config.num_blocks == 3 and report.steps == 3
    assert day.model.states["adapt"].config.aligner_kind == "mlp"


def test_runtime_switch_starts_from_pretrained_lidar_aligners(model):
    from adapt.algorithm import runtime_adapt

    day = make("mpnp", model)
    resident = day.model
    # An offline LiDAR state (here: random aligners made distinct from a fresh init).
    resident.create_state("offline-lidar", [LIDAR], ConnectionConfig(num_blocks=3))
    with torch.no_grad():
        for p in resident.states["offline-lidar"].aligners["lidar"].parameters():
            p.add_(1.0)
    pretrained = {k: v.clone() for k, v in
                  resident.states["offline-lidar"].aligners["lidar"].state_dict().items()}
    # A rate far below float32 resolution: the run leaves the weights where they started.
    frozen = {"aligners": 1e-30, "lora": 1e-30, "connections": 1e-30}
    fork, _, _ = runtime_adapt(
        day, "switch", {"camera": CAM, "lidar": LIDAR}, feature_set(), None,
        TrainConfig(epochs=1, batch_size=6, learning_rates=frozen), num_blocks=3,
        aligners_from="offline-lidar", progress=False)
    got = fork.model.states[fork.state_name].aligners["lidar"].state_dict()
    assert all(torch.equal(got[k], pretrained[k]) for k in pretrained)
    fresh, _, _ = runtime_adapt(
        day, "switch", {"camera": CAM, "lidar": LIDAR}, feature_set(), None,
        TrainConfig(epochs=1, batch_size=6, learning_rates=frozen), num_blocks=3,
        name="fresh", progress=False)
    other = fresh.model.states[fresh.state_name].aligners["lidar"].state_dict()
    assert not torch.equal(other["key_pos"], pretrained["key_pos"])
