"""The offline stage end to end on a tiny world, tiny encoders and a tiny LLM; then a
runtime switch from the state it saved."""

from __future__ import annotations

import json

import pytest

from adapt.algorithm import plan_num_blocks, runtime_adapt, select_modalities
from adapt.data import load_splits, modality_specs
from adapt.prepare import (
    PrepareConfig,
    ensure_prepared,
    fast_train_config,
    load_day_connector,
    open_prepared,
)
from aligners.model import MPnPModel
from encoders.pretrain import PretrainConfig
from mpnp.tiny import tiny_llm
from scenes.synthetic import WorldConfig

CAM = {"image_height": 32, "image_width": 56, "patch_size": 8, "embed_dim": 32, "depth": 1,
       "num_heads": 2, "cls_blocks": 1}
LIDAR = {"range_width": 128, "embed_dim": 32, "depth": 1, "num_heads": 2, "token_blocks": 1}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    llm, tok = tiny_llm("llama", num_layers=4)
    config = PrepareConfig(
        world=WorldConfig(day_frames=20, night_frames=12, frames_per_scene=2,
                          questions_per_frame=3, image_height=32, image_width=56,
                          lidar_width=128),
        pretrain={"camera-vit": PretrainConfig(epochs=1, corpus=None, encoder=CAM),
                  "lidar-rangevit": PretrainConfig(epochs=1, corpus=None, encoder=LIDAR)},
        num_blocks=2, day_samples=12, train=fast_train_config(epochs=1),
    )
    first = ensure_prepared(store, config, llm=llm, tokenizer=tok, progress=False)
    return store, config, llm, tok, first


def test_prepare_builds_everything_in_the_store(prepared):
    store, _, _, _, first = prepared
    assert (first.data_dir / "manifest.json").is_file()
    assert (store / "encoders" / "camera-vit").is_dir()
    assert (first.state_dir / "state.json").is_file()
    record = json.loads((first.state_dir / "prepare.json").read_text())
    assert record["num_blocks"] == 2 and record["day_questions"] == 12
    assert 0.0 <= record["day_accuracy"] <= 1.0
    assert record["train"]["flops"] > 0


def test_prepare_again_reuses_what_is_there(prepared):
    store, config, llm, tok, first = prepared
    mtime = (first.state_dir / "prepare.json").stat().st_mtime_ns
    again = ensure_prepared(store, config, llm=llm, tokenizer=tok, progress=False)
    assert again.record == first.record
    assert (first.state_dir / "prepare.json").stat().st_mtime_ns == mtime


def test_open_prepared_finds_what_prepare_left(prepared, tmp_path):
    store, _, _, _, first = prepared
    opened = open_prepared(store)
    assert opened.record == first.record and opened.data_dir == first.data_dir
    assert {m: e.fingerprint() for m, e in opened.encoders.items()
            if m in first.record["encoders"]} == first.record["encoders"]
    # a sensor outside the day state's record (the radar) is pretrained and loaded too
    assert set(opened.encoders) == {"camera", "lidar", "radar"} == set(first.encoders)
    assert opened.encoders["radar"].fingerprint() == first.encoders["radar"].fingerprint()
    with pytest.raises(FileNotFoundError, match="mpnp prepare"):
        open_prepared(tmp_path)


def test_runtime_switch_from_the_saved_state(prepared):
    _, _, llm, tok, first = prepared
    model = MPnPModel(llm, tok)
    day = load_day_connector(first, model)
    assert day.modality_names == ["camera"]
    splits = load_splits(first.data_dir, first.encoders, first.feature_cache(), progress=False)
    specs = modality_specs(first.encoders)
    with pytest.raises(ValueError, match="mode must be one of"):
        select_modalities("swap", specs)
    decision = plan_num_blocks(llm, tok, [specs["lidar"]], splits.night_train,
                               fast_train_config(epochs=1), budget_flops=1e18)
    assert decision.num_blocks == 4  # a huge budget connects every block
    fork, report, chosen = runtime_adapt(
        day, "switch", specs, splits.night_train, None, fast_train_config(epochs=1),
        budget_flops=decision.step_flops * decision.steps * 0.999, progress=False)
    assert chosen is not None and chosen.num_blocks < 4
    assert model.states[fork.state_name].connected == ["lidar"]
    assert model.states["day-camera"].connected == ["camera"]
    assert report.samples == len(splits.night_train)


def test_the_anchored_recipe_prepares_aligners_for_every_sensor(prepared):
    """Algorithm 1's offline stage with the anchored recipe: the day state's camera aligners
    and every other sensor's are text-anchored; the daemon's connector loads the latter."""
    import dataclasses

    from adapt.recipe import ALIGNER_STATE, recipe_named, with_anchor

    store, config, llm, tok, first = prepared
    recipe = with_anchor(recipe_named("anchored"), frames=8, steps=5, batch_size=4)
    anchored = ensure_prepared(store, dataclasses.replace(config, recipe=recipe), llm=llm,
                               tokenizer=tok, progress=False)
    record = anchored.record
    assert record["config_digest"] != first.record["config_digest"]  # retrained
    assert set(record["anchoring"]) == {"camera", "offline lidar"}
    assert anchored.aligners_dir is not None and anchored.aligners_dir.name == ALIGNER_STATE
    model = MPnPModel(llm, tok)
    day = load_day_connector(anchored, model)
    assert model.active_name == day.state_name == "day-camera"
    assert model.states["day-camera"].config.aligner_space == "hidden"
    donor = model.states[ALIGNER_STATE]
    assert list(donor.aligners) == ["lidar"] and len(donor.connected_layers()) == 4
