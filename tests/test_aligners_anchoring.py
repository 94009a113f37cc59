"""Text-anchored aligner pretraining (aligners/anchoring.py); encoders' token descriptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_encoders import make_frame

from aligners.anchoring import (
    AnchorConfig,
    _scene_text,
    _token_spans,
    anchor_aligners,
    anchor_modality,
    text_anchors,
)
from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from encoders import create_encoder
from encoders.oracle import SUMMARY_FILTERS, describe_scene
from encoders.targets import object_phrase, region_descriptions
from mpnp.tiny import tiny_llm
from scenes.sample import ObjectAnnotation


def _frame(seed: int = 0):
    frame = make_frame(seed)
    frame.objects = [
        ObjectAnnotation("bus", (-20.0, 0.0, 1.6), (2.8, 11.0, 3.2), np.pi, "moving"),
        ObjectAnnotation("traffic cone", (3.0, 3.0, 0.4), (0.5, 0.5, 0.8), 0.0, None),
        ObjectAnnotation("car", (12.0, 0.5, 0.8), (1.9, 4.5, 1.6), 0.0, "parked"),
    ]
    return frame


def test_oracle_tokens_are_described_by_their_objects_and_match_the_scene_words():
    frame = _frame()
    oracle = create_encoder("oracle", max_objects=5)
    words = oracle.describe_tokens(frame)
    assert words == ["traffic cone front left", "parked car front", "moving bus back",
                     None, None]
    assert describe_scene(frame, 5) == "objects: traffic cone front left, parked car front, " \
        "moving bus back."
    summaries = create_encoder("oracle", max_objects=5, summaries=True)
    described = summaries.describe_tokens(frame)
    assert len(described) == summaries.num_tokens and described[:5] == words
    by_filter = dict(zip(SUMMARY_FILTERS, described[5:]))
    assert by_filter[("car", None)] == "1 car"
    assert by_filter[("car", "parked")] == "1 parked car"
    assert by_filter[("car", "moving")] == "no moving cars"
    assert by_filter[("bus", None)] == "1 bus"
    assert by_filter[(None, "moving")] == "1 moving thing"
    assert by_filter[("traffic cone", None)] == "1 traffic cone"
    assert by_filter[("pedestrian", "not standing")] == "no pedestrians that are not standing"


def test_region_descriptions_follow_the_regions_of_the_sensor_tokens():
    frame = _frame()
    views = region_descriptions(frame, "views", 6)
    assert views == ["parked car front", "nothing", "nothing", "moving bus back", "nothing",
                     "traffic cone front left"]  # CAMERA_VIEWS order
    bands = region_descriptions(frame, "bands", 8)  # band 0 starts behind the vehicle
    assert bands[3] == "traffic cone front left and parked car front"  # nearest first
    assert bands[7] == "moving bus back"
    assert sum(d != "nothing" for d in bands) == 2
    camera = create_encoder("camera-vit", cls_blocks=2)
    per_token = camera.describe_tokens(frame)
    assert len(per_token) == camera.num_tokens
    assert per_token[0] == per_token[1] == views[0]  # region-major
    with pytest.raises(ValueError, match="regions"):
        region_descriptions(frame, "rings", 3)
    assert object_phrase(frame.objects[1]) == "traffic cone front left"


def test_spans_cover_exactly_each_descriptions_tokens():
    _, tok = tiny_llm("llama", num_layers=2)
    text, spans = _scene_text(["parked car front", None, "bus back", "parked car front"])
    assert text == "objects: parked car front, bus back."
    ids, found = _token_spans(tok, text, spans)
    assert [d for d, _ in found] == ["parked car front", "bus back"]
    for d, where in found:
        assert tok.decode([ids[i] for i in where]) == d  # the character tokenizer: exact


def _anchored_model(space="hidden", block_maps=True, num_blocks=2):
    llm, tok = tiny_llm("llama", num_layers=3)
    model = MPnPModel(llm, tok)
    torch.manual_seed(0)
    model.create_state("s", [ModalitySpec("oracle", 6, 4)],
                       ConnectionConfig(num_blocks=num_blocks, gate="logit",
                                        aligner_space=space, block_maps=block_maps))
    return model


def test_targets_are_the_base_llms_keys_of_the_words_whatever_state_is_active():
    model = _anchored_model()
    with torch.no_grad():  # a state with LoRA that changes the text keys
        for name, p in model.parameter_groups()["lora"].items():
            if name.endswith("lora_B"):
                p.normal_()
    descriptions = [["car front", "bus back"], ["car front", None]]
    targets = text_anchors(model, descriptions, [1, 2])
    assert model.active_name == "s"  # restored
    assert targets.keys.shape == (2, 2, model.geometry.kv_width)
    # By hand: the base LLM's k_proj output over the words of "car front" in frame 0.
    text, spans = _scene_text(descriptions[0])
    ids, found = _token_spans(model.tokenizer, text, spans)
    seen = {}
    attn = model.attention_modules[2]
    hook = attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out))
    model.activate(None)
    with torch.no_grad():
        model.llm(input_ids=torch.tensor([ids]))
    hook.remove()
    first = seen["k"][0, found[0][1]].mean(0)
    text1, spans1 = _scene_text(descriptions[1])
    ids1, found1 = _token_spans(model.tokenizer, text1, spans1)
    hook = attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out))
    with torch.no_grad():
        model.llm(input_ids=torch.tensor([ids1]))
    hook.remove()
    second = seen["k"][0, found1[0][1]].mean(0)
    row = targets.index["car front"]
    torch.testing.assert_close(targets.keys[row, 1], (first + second) / 2)  # block 2
    assert targets.ids([["bus back", None, "never read"]]).tolist() == [[1, -1, -1]]


@pytest.mark.parametrize("space,block_maps", [("hidden", True), ("kv", False)])
def test_anchoring_fits_the_tokens_to_their_descriptions(space, block_maps):
    model = _anchored_model(space, block_maps)
    descriptions = [["car front", "bus back", "cone front left", None]] * 3
    targets = text_anchors(model, descriptions, model.state.connected_layers())
    ids = targets.ids(descriptions)
    tokens = torch.randn(3, 4, 6)
    before = anchor_aligners(model, "oracle", tokens, ids, targets, AnchorConfig(steps=1))
    after = anchor_aligners(model, "oracle", tokens, ids, targets,
                            AnchorConfig(steps=300, lr=3e-3, batch_size=3))
    assert after.key_nmse < 0.5 * before.key_nmse
    assert after.value_nmse < 0.5 * before.value_nmse
    assert after.tokens == 9 and after.targets == 3
    # Only the aligners moved: the LLM's own weights and LoRA are untouched.
    assert all(p.grad is None for p in model.llm.parameters())


def test_anchor_modality_reads_the_encoders_descriptions_and_refuses_bad_input():
    model = _anchored_model()
    oracle = create_encoder("oracle", max_objects=4)
    model.remove_state("s")
    model.create_state("s", [ModalitySpec("oracle", oracle.dim, 4)],
                       ConnectionConfig(num_blocks=2, aligner_space="hidden"))
    frames = [_frame(i) for i in range(3)]
    tokens = oracle.encode(frames)
    report = anchor_modality(model, "oracle", oracle, frames, tokens,
                             AnchorConfig(frames=3, steps=5))
    assert report.targets == 3 and report.tokens == 9
    with pytest.raises(ValueError, match="frames"):
        anchor_modality(model, "oracle", oracle, frames[:2], tokens)
    with pytest.raises(ValueError, match="no aligners"):
        anchor_aligners(model, "camera", tokens, torch.zeros(3, 4, dtype=torch.long),
                        report_targets := text_anchors(model, [["car front"]], [2]))
    with pytest.raises(ValueError, match="no token"):
        anchor_aligners(model, "oracle", tokens, -torch.ones(3, 4, dtype=torch.long),
                        report_targets)
    with pytest.raises(ValueError, match="steps"):
        AnchorConfig(steps=0)


def test_anchoring_under_bfloat16_autocast_fits_as_float32_does():
    """Autocast speeds the LLM reads and the fit up; the aligners stay float32 and the fit
    reaches what float32 reaches."""
    descriptions = [["car front", "bus back", "cone front left", None]] * 3
    tokens = torch.randn(3, 4, 6)
    fits = {}
    for mode in ("off", "bfloat16"):
        torch.manual_seed(0)
        model = _anchored_model()
        targets = text_anchors(model, descriptions, model.state.connected_layers(),
                               autocast=mode)
        fits[mode] = anchor_aligners(model, "oracle", tokens, targets.ids(descriptions),
                                     targets, AnchorConfig(steps=300, lr=3e-3, batch_size=3),
                                     autocast=mode)
        assert all(p.dtype == torch.float32 for p in model.state.aligners["oracle"].parameters())
        assert targets.keys.dtype == torch.float32
    for name in ("key_nmse", "value_nmse"):
        assert getattr(fits["bfloat16"], name) < getattr(fits["off"], name) * 1.5 + 0.02
