"""Model composition (NaiveMC, DAMC): C + L from separately adapted states, no training."""

from __future__ import annotations

import pytest
import torch

from aligners.compose import (
    CompositionError,
    ValScore,
    compose_states,
    lora_delta,
    search_lambdas,
)
from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from aligners.state import (
    StateData,
    install_state,
    load_state,
    read_state,
    snapshot_state,
    write_state,
)
from mpnp.cli import main
from mpnp.generation import encode_prompts, generate_answers
from mpnp.tiny import tiny_llm

CAM = ModalitySpec("camera", 8, 3)
LIDAR = ModalitySpec("lidar", 6, 2)
LAYERS = 4


def _model(seed: int = 0) -> MPnPModel:
    llm, tok = tiny_llm("llama", num_layers=LAYERS, seed=seed)
    return MPnPModel(llm, tok)


def _state(model: MPnPModel, name: str, specs, n: int, seed: int, **conn) -> StateData:
    """A 'trained' state: every tensor moved off its init (LoRA B is zero at init)."""
    model.create_state(name, specs, ConnectionConfig(num_blocks=n, **conn), activate=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.state_tensors(name).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return snapshot_state(model, name)


def _tokens(batch: int = 2, seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"camera": torch.randn(batch, 3, 8, generator=gen),
            "lidar": torch.randn(batch, 2, 6, generator=gen)}


def _logits(model: MPnPModel, name: str, tokens=None) -> torch.Tensor:
    model.activate(name)
    batch = encode_prompts(model.tokenizer, ["How many cars?", "Is there a bus?"])
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, tokens or _tokens(),
                     position_ids=batch.position_ids).logits


@pytest.fixture
def pair():
    """A camera state (N=2) and a LiDAR state (N=3) of the same tiny LLM."""
    model = _model()
    cam = _state(model, "cam", [CAM], 2, seed=1)
    lidar = _state(model, "lid", [LIDAR], 3, seed=2)
    return model, cam, lidar


def _assert_same_tensors(a: StateData, b: StateData) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def test_composing_a_state_with_itself_reproduces_it_exactly(pair):
    model, cam, _ = pair
    expected = _logits(model, "cam")
    for composed in (compose_states([cam], "damc", lambdas=[1.0]),
                     compose_states([cam, cam], "naive-ab"),
                     compose_states([cam], "naive")):
        _assert_same_tensors(composed, cam)
        assert composed.config["connection"] == cam.config["connection"]
        assert composed.connected == cam.connected and composed.num_blocks == 2
        name = install_state(model, composed, name="self", activate=False)
        assert torch.equal(_logits(model, name), expected)
        model.remove_state(name)


def test_composed_state_saves_and_loads_exactly(pair, tmp_path):
    model, cam, lidar = pair
    for method, extra in (("naive", {}), ("damc", {"lambdas": [0.7, 0.4]})):
        composed = compose_states([cam, lidar], method, name="cl", **extra)
        write_state(composed, tmp_path / method)
        back = read_state(tmp_path / method)
        _assert_same_tensors(back, composed)
        assert back.config == composed.config
        install_state(model, composed, name="mem", activate=False)
        fresh = _model()  # a second copy of the same LLM, as after a restart
        load_state(fresh, tmp_path / method, name="disk")
        assert torch.equal(_logits(fresh, "disk"), _logits(model, "mem"))
        model.remove_state("mem")


def test_states_of_different_llms_are_refused(pair, tmp_path):
    _, cam, _ = pair
    other = _state(_model(seed=1), "lid", [LIDAR], 3, seed=2)  # same shape, other weights
    with pytest.raises(CompositionError, match="another LLM.*embedding_sha256"):
        compose_states([cam, other], "naive")
    deeper_model = MPnPModel(*tiny_llm("llama", num_layers=6, seed=0))
    deeper = _state(deeper_model, "lid", [LIDAR], 3, seed=2)
    with pytest.raises(CompositionError, match="num_layers"):
        compose_states([cam, deeper], "damc", lambdas=[0.5, 0.5])
    write_state(cam, tmp_path / "c")
    write_state(other, tmp_path / "l")
    assert main(["compose", str(tmp_path / "c"), str(tmp_path / "l"), "-o",
                 str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_delta_mean_equals_the_mean_of_the_inputs_deltas(pair):
    _, cam, lidar = pair
    composed = compose_states([cam, lidar], "naive")
    assert composed.config["connection"]["lora_r"] == 16  # Σ r: exact, not rank 8
    for j in range(LAYERS - 3, LAYERS):
        for proj in ("k_proj", "v_proj"):
            ins = [d for s in (cam, lidar) if (d := lora_delta(s, j, proj)) is not None]
            want = sum(ins) / len(ins)
            got = lora_delta(composed, j, proj)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # DAMC: Σ λ_m ΔW_m, an input contributing nothing where it does not connect.
    damc = compose_states([cam, lidar], "damc", lambdas=[0.3, 0.9])
    for j in range(LAYERS - 3, LAYERS):
        for proj in ("k_proj", "v_proj"):
            want = 0.9 * lora_delta(lidar, j, proj)
            if j >= LAYERS - 2:
                want = want + 0.3 * lora_delta(cam, j, proj)
            torch.testing.assert_close(lora_delta(damc, j, proj), want, rtol=1e-6, atol=1e-7)
    # The mean of A and B separately is a different model: the two must not coincide.
    ab = compose_states([cam, lidar], "naive-ab")
    assert ab.config["connection"]["lora_r"] == 8
    assert not torch.allclose(lora_delta(ab, 3, "k_proj"), lora_delta(composed, 3, "k_proj"))


def test_two_identical_copies_by_delta_mean_give_the_same_model(pair):
    model, cam, _ = pair
    composed = compose_states([cam, cam], "naive")
    install_state(model, composed, name="twice", activate=False)
    torch.testing.assert_close(_logits(model, "twice"), _logits(model, "cam"),
                               rtol=1e-5, atol=1e-5)


def test_differing_n_is_combined_as_documented(pair):
    _, cam, lidar = pair  # camera connects blocks 2-3, LiDAR blocks 1-3
    w_c, w_l = cam.tensors["connections.weight"], lidar.tensors["connections.weight"]
    union = compose_states([cam, lidar], "naive-ab")
    assert union.num_blocks == 3 and union.connected == ["camera", "lidar"]
    w = union.tensors["connections.weight"]
    assert torch.equal(w[1], w_l[1])  # only LiDAR connects block 1: its value
    assert torch.equal(w[2:], (w_c[2:] + w_l[2:]) / 2)
    for part in ("lora_A", "lora_B"):
        key = f"lora.1.k_proj.{part}"
        assert torch.equal(union.tensors[key], lidar.tensors[key])
        key = f"lora.3.v_proj.{part}"
        assert torch.equal(union.tensors[key], (cam.tensors[key] + lidar.tensors[key]) / 2)
    naive = compose_states([cam, lidar], "naive")
    torch.testing.assert_close(lora_delta(naive, 1, "k_proj"), lora_delta(lidar, 1, "k_proj"),
                               rtol=1e-6, atol=1e-7)
    inter = compose_states([cam, lidar], "naive", blocks="intersection")
    assert inter.num_blocks == 2
    assert not any(k.startswith("lora.1.") for k in inter.tensors)
    assert torch.equal(inter.tensors["connections.weight"][2:], (w_c[2:] + w_l[2:]) / 2)
    # Modality parameters are copied as they are, positional embeddings included.
    for s in (cam, lidar):
        for key, value in s.tensors.items():
            if key.startswith("aligners."):
                assert torch.equal(union.tensors[key], value), key
    assert any(k.endswith("key_pos") for k in union.tensors)


def test_composed_model_answers_with_both_modalities(pair):
    model, cam, lidar = pair
    composed = compose_states([cam, lidar], "naive")
    name = install_state(model, composed, name="cl")
    assert model.state.connected == ["camera", "lidar"]
    tokens = _tokens()
    out = generate_answers(model, ["How many cars?", "Is there a bus?"], tokens,
                           max_new_tokens=3)
    assert len(out.answers) == 2 and out.token_ids.shape[0] == 2
    base = _logits(model, name, tokens)
    for modality in ("camera", "lidar"):  # each modality's tokens reach the model
        changed = dict(tokens, **{modality: tokens[modality] + 1.0})
        assert not torch.allclose(_logits(model, name, changed), base)
    with pytest.raises(ValueError, match="tokens missing"):
        _logits(model, name, {"camera": tokens["camera"]})


def test_conflicting_aligners_are_refused_unless_told(pair):
    model, cam, lidar = pair
    cam2 = _state(model, "cam2", [CAM], 2, seed=5)
    with pytest.raises(CompositionError, match="different aligners for 'camera'"):
        compose_states([cam, cam2, lidar], "naive")
    won = compose_states([cam, cam2, lidar], "naive", prefer={"camera": 1})
    key = "aligners.camera.key.net.0.weight"
    assert torch.equal(won.tensors[key], cam2.tensors[key])
    with pytest.raises(CompositionError, match="does not carry"):
        compose_states([cam, cam2, lidar], "naive", prefer={"camera": 2})
    # A switch state C -> L still carries its (disconnected) camera aligners: the camera
    # state's connected ones win without being told.
    model.create_state("switch", [CAM, LIDAR], ConnectionConfig(num_blocks=3))
    with torch.no_grad():
        for p in model.state_tensors("switch").values():
            p.add_(0.1)
    model.disconnect("camera")
    switch = snapshot_state(model, "switch")
    composed = compose_states([switch, cam], "naive")
    assert torch.equal(composed.tensors[key], cam.tensors[key])
    assert composed.config["composition"]["modality_from"] == {"camera": 1, "lidar": 0}


def test_incompatible_configs_and_missing_lambdas_are_clear_errors(pair):
    model, cam, lidar = pair
    with pytest.raises(CompositionError, match="damc needs its λ"):
        compose_states([cam, lidar], "damc")
    with pytest.raises(CompositionError, match="not both"):
        compose_states([cam, lidar], "damc", lambdas=[0.5, 0.5], evaluate=lambda s: 0.0)
    with pytest.raises(CompositionError, match="are for damc"):
        compose_states([cam, lidar], "naive", lambdas=[0.5, 0.5])
    with pytest.raises(CompositionError, match="one finite λ"):
        compose_states([cam, lidar], "damc", lambdas=[0.5])
    logit = _state(model, "logit", [LIDAR], 3, seed=3, gate="logit")
    with pytest.raises(CompositionError, match="gate"):
        compose_states([cam, logit], "naive")
    r4 = _state(model, "r4", [LIDAR], 3, seed=3, lora_r=4)
    with pytest.raises(CompositionError, match="lora_r.*use naive or damc"):
        compose_states([cam, r4], "naive-ab")
    mixed = compose_states([cam, r4], "naive")  # ranks may differ for ΔW merges
    assert mixed.config["connection"]["lora_r"] == 12
    torch.testing.assert_close(lora_delta(mixed, 1, "v_proj"), lora_delta(r4, 1, "v_proj"),
                               rtol=1e-6, atol=1e-7)


def test_lambda_search_is_bounded_and_counts_its_cost(pair):
    _, cam, lidar = pair
    seen: list[tuple[float, ...]] = []

    def score(candidate: StateData) -> ValScore:
        lams = tuple(candidate.config["composition"]["lambdas"])
        seen.append(lams)
        return ValScore(-(lams[0] - 0.75) ** 2 - (lams[1] - 0.25) ** 2, questions=10,
                        flops=1e6)

    search = search_lambdas([cam, lidar], score, max_evals=12)
    assert search.lambdas == (0.75, 0.25)
    assert seen[0] == (0.5, 0.5)  # the authors' hand choice 1/M comes first
    assert len(seen) == len(set(seen)) == search.evaluations <= 12
    assert search.questions == 10 * search.evaluations and search.flops == 1e6 * len(seen)
    short = search_lambdas([cam, lidar], score, max_evals=3)
    assert short.evaluations == 3
    composed = compose_states([cam, lidar], "damc", evaluate=score, max_evals=4)
    info = composed.config["composition"]
    assert info["search"]["evaluations"] == 4 and info["lambdas"] == list(info["search"][
        "lambdas"])
    assert info["training_flops"] == 0


# --------------------------------------------------------------------------- CLI + val data


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny prepared store (world, encoders, day camera state) and the LLM on disk."""
    from adapt.prepare import PrepareConfig, ensure_prepared, fast_train_config
    from encoders.pretrain import PretrainConfig
    from scenes.synthetic import WorldConfig

    root = tmp_path_factory.mktemp("store")
    llm, tok = tiny_llm("llama", num_layers=LAYERS)
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    cam_enc = {"image_height": 32, "image_width": 56, "patch_size": 8, "embed_dim": 32,
               "depth": 1, "num_heads": 2, "cls_blocks": 1}
    lidar_enc = {"range_width": 128, "embed_dim": 32, "depth": 1, "num_heads": 2,
                 "token_blocks": 1}
    config = PrepareConfig(
        world=WorldConfig(day_frames=12, night_frames=12, frames_per_scene=2,
                          questions_per_frame=2, image_height=32, image_width=56,
                          lidar_width=128),
        pretrain={"camera-vit": PretrainConfig(epochs=1, corpus=None, encoder=cam_enc),
                  "lidar-rangevit": PretrainConfig(epochs=1, corpus=None, encoder=lidar_enc)},
        num_blocks=2, day_samples=8, train=fast_train_config(epochs=1),
    )
    prepared = ensure_prepared(root, config, llm=llm, tokenizer=tok, progress=False)
    from adapt.data import modality_specs

    model = MPnPModel(llm, tok)
    lidar = _state(model, "night-lidar", [modality_specs(prepared.encoders)["lidar"]], 3, 4)
    write_state(lidar, root / "states" / "night-lidar")
    return root, prepared


def test_cli_search_reads_only_the_validation_split(store, tmp_path, monkeypatch, capsys):
    from scenes.dataset import QADataset

    root, prepared = store
    night_val = len(QADataset.load(prepared.data_dir, "val").filter(night=True))
    per_eval = min(5, night_val)
    original = QADataset.load.__func__
    opened = []

    def only_val(cls, data_root, split, **kw):
        opened.append(split)
        if split != "val":
            raise AssertionError(f"the λ search opened the {split!r} split")
        return original(cls, data_root, split, **kw)

    monkeypatch.setattr(QADataset, "load", classmethod(only_val))
    out = tmp_path / "cl"
    rc = main(["compose", "day-camera", "night-lidar", "--method", "damc", "--search",
               "--store", str(root), "--model", str(root / "llm"), "--max-evals", "3",
               "--val-samples", "5", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert opened == ["val"]
    info = read_state(out).config["composition"]
    search = info["search"]
    assert search["evaluations"] == 3 and search["questions"] == 3 * per_eval
    assert [t["questions"] for t in search["trials"]] == [per_eval] * 3
    assert search["inference_flops"] > 0 and search["wall_s"] > 0
    assert read_state(out).connected == ["camera", "lidar"]
    assert f"3 evaluations, {3 * per_eval} validation questions" in capsys.readouterr().out


def test_cli_naive_and_damc_errors(store, tmp_path, capsys):
    root, _ = store
    out = tmp_path / "n"
    assert main(["compose", "day-camera", "night-lidar", "--store", str(root),
                 "--method", "naive-ab", "-o", str(out)]) == 0
    assert read_state(out).num_blocks == 3
    assert main(["compose", "day-camera", "night-lidar", "--store", str(root),
                 "--method", "damc", "-o", str(tmp_path / "d")]) == 1
    assert "needs its λ: give --lambdas" in capsys.readouterr().err
    assert main(["compose", "day-camera", "night-lidar", "--store", str(root), "--method",
                 "damc", "--lambdas", "0.6,0.3", "-o", str(tmp_path / "d")]) == 0
    assert read_state(tmp_path / "d").config["composition"]["lambdas"] == [0.6, 0.3]
