"""The mPnP recipe (adapt/recipe.py): one definition for the offline stage, Table 1 and the
daemon; Algorithm 1's offline aligners for every modality and runtime Adapt starting from them."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from test_encoders import make_frame

from adapt.engine import prepare_candidate
from adapt.features import FeatureSet
from adapt.precision import AUTOCAST_MODES
from adapt.prepare import PrepareConfig
from adapt.recipe import (
    ALIGNER_STATE,
    ANCHORED,
    PAPER,
    Recipe,
    pretrain_aligners,
    recipe_named,
    with_anchor,
)
from aligners.anchoring import AnchorConfig
from aligners.config import ModalitySpec
from aligners.model import MPnPModel
from bench.table1 import add_bench_command, config_from_args
from encoders import create_encoder
from mpnp.tiny import tiny_llm
from scenes.sample import ObjectAnnotation, QAItem


def test_recipes_by_name_and_their_connections():
    anchored = recipe_named("anchored")
    assert anchored == ANCHORED and anchored is not ANCHORED  # a copy
    conn = anchored.connection(6)
    assert (conn.num_blocks, conn.gate, conn.init_alpha, conn.aligner_space, conn.block_maps) \
        == (6, "logit", 0.05, "hidden", True)
    assert PAPER.connection(3).aligner_space == "kv" and PAPER.anchor is None
    assert Recipe.from_dict(anchored.to_dict()) == anchored
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_named("fancy")
    with pytest.raises(ValueError, match="unknown Recipe fields"):
        Recipe.from_dict({"gates": "logit"})
    with pytest.raises(ValueError, match="aligner_space"):
        Recipe(aligner_space="latent")
    assert with_anchor(anchored, steps=5).anchor.steps == 5 and anchored.anchor.steps != 5
    assert with_anchor(PAPER, steps=5) is PAPER
    assert "hidden-space" in anchored.describe() and "text-anchored" in anchored.describe()


def test_the_papers_recipe_keeps_day_states_made_before_recipes_existed_valid():
    config = PrepareConfig()
    fields = dataclasses.asdict(config)
    fields.pop("extra_encoders")
    fields.pop("recipe")
    fields["train"].pop("autocast")  # nor before autocast existed, whichever is chosen
    before = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    assert config.digest() == before.hexdigest()[:16]
    assert PrepareConfig(recipe=recipe_named("anchored")).digest() != config.digest()
    for mode in AUTOCAST_MODES:
        assert dataclasses.replace(config, train=dataclasses.replace(
            config.train, autocast=mode)).digest() == config.digest()


def test_table1_takes_the_recipe_from_the_command_line():
    import argparse

    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    cfg = config_from_args(parser.parse_args(["table1", "--recipe", "anchored"]))
    assert cfg.recipe == ANCHORED
    quick = config_from_args(parser.parse_args(["table1", "--quick", "--recipe", "anchored"]))
    assert quick.recipe.anchor.frames == 16 and quick.recipe.anchor.steps == 20
    assert config_from_args(parser.parse_args(["table1"])).recipe == PAPER


def _frames(n: int):
    out = []
    for i in range(n):
        frame = make_frame(i)
        frame.frame_id = f"f{i}"
        frame.objects = [
            ObjectAnnotation("car", (8.0 + i, 1.0, 0.8), (1.9, 4.5, 1.6), 0.0, "parked"),
            ObjectAnnotation("pedestrian", (-5.0, 3.0 - i, 0.9), (0.6, 0.5, 1.8), 0.0,
                             "standing"),
        ]
        out.append(frame)
    return out


def test_runtime_adapt_starts_new_sensors_from_the_offline_aligners():
    from adapt.connectors.base import ConnectorConfig
    from adapt.connectors.mpnp import MPnPConnector

    llm, tok = tiny_llm("llama", num_layers=3)
    model = MPnPModel(llm, tok)
    oracle = create_encoder("oracle", max_objects=3)  # stands in for a sensor encoder
    frames = _frames(4)
    by_id = {f.frame_id: f for f in frames}
    tokens = oracle.encode(frames)
    specs = {"camera": ModalitySpec("camera", 5, 2),
             "lidar": ModalitySpec("lidar", oracle.dim, oracle.num_tokens)}
    data = FeatureSet([QAItem(f.frame_id, "q", "yes", "exist", 0) for f in frames],
                      {"camera": {f.frame_id: torch.randn(2, 5) for f in frames},
                       "lidar": {f.frame_id: tokens[i] for i, f in enumerate(frames)}})
    recipe = Recipe(gate="logit", init_alpha=0.05, aligner_space="hidden", block_maps=True,
                    anchor=AnchorConfig(frames=4, steps=30, batch_size=4))
    serving = MPnPConnector(llm, tok, [specs["camera"]], ConnectorConfig(num_blocks=2),
                            model=model, state_name="day", connection=recipe.connection(2))
    reports = pretrain_aligners(model, specs, {"lidar": oracle}, data, by_id.__getitem__,
                                recipe, model.geometry.num_layers, ["lidar"])
    assert model.active_name == "day" and ALIGNER_STATE in model.states
    assert reports["lidar"]["targets"] == 3  # distinct phrases read
    donor = model.states[ALIGNER_STATE]
    assert list(donor.connected_layers()) == [0, 1, 2] and not donor.config.lora
    fork = prepare_candidate(serving, [specs["camera"], specs["lidar"]], "night", seed=0,
                             aligners_from=ALIGNER_STATE)
    theirs = donor.aligners["lidar"].state_dict()
    for key, value in model.states[fork.state_name].aligners["lidar"].state_dict().items():
        torch.testing.assert_close(value, theirs[key])
    fresh = prepare_candidate(serving, [specs["camera"], specs["lidar"]], "night2", seed=0)
    assert not torch.equal(model.states[fresh.state_name].aligners["lidar"].key.net[0].weight,
                           donor.aligners["lidar"].key.net[0].weight)  # fresh, not anchored
    with pytest.raises(ValueError, match="anchoring"):
        pretrain_aligners(model, specs, {"lidar": oracle}, data, by_id.__getitem__, PAPER, 3,
                          ["lidar"])
    assert np.isfinite(reports["lidar"]["key_nmse"])


def test_anchoring_reads_only_the_frames_the_training_questions_ask_about():
    from adapt.recipe import anchor_state

    llm, tok = tiny_llm("llama", num_layers=3)
    model = MPnPModel(llm, tok)
    oracle = create_encoder("oracle", max_objects=3)
    frames = _frames(4)
    tokens = oracle.encode(frames)
    data = FeatureSet([QAItem("f1", "q", "yes", "exist", 0), QAItem("f3", "q", "no", "exist", 0)],
                      {"lidar": {f.frame_id: tokens[i] for i, f in enumerate(frames)}})
    recipe = Recipe(aligner_space="hidden", anchor=AnchorConfig(frames=10, steps=2))
    model.create_state("s", [ModalitySpec("lidar", oracle.dim, oracle.num_tokens)],
                       recipe.connection(2))
    seen = []
    report = anchor_state(model, "lidar", oracle, data,
                          lambda fid: seen.append(fid) or frames[int(fid[1:])], recipe)
    assert sorted(seen) == ["f1", "f3"] and report.tokens == 4  # two objects each
    assert anchor_state(model, "lidar", oracle, data, seen.append, PAPER) is None
