"""Object-slot encoders (encoders/slots.py): shapes, targets, descriptions and pretraining."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_encoders import TINY, make_frame
from test_encoders_pretrain import WORLD, _frame_with

from encoders import create_encoder, load_encoder
from encoders.pretrain import RECORD_FILE, PretrainConfig, encoder_dir, ensure_pretrained
from encoders.targets import (
    IGNORE,
    OBJECT_FIELDS,
    STATUS_NAMES,
    slot_descriptions,
    slot_targets,
)
from scenes.layout import CLASS_NAMES
from scenes.questions import RELATIONS
from scenes.sample import CAMERA_VIEWS, ObjectAnnotation
from scenes.synthetic import WorldConfig, generate_world

SLOTTED = {"camera-vit": {**TINY["camera-vit"], "slots": 2},
           "lidar-rangevit": {**TINY["lidar-rangevit"], "slots": 3}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(WorldConfig(**WORLD), tmp_path_factory.mktemp("world"), progress=False)


@pytest.mark.parametrize("kind", sorted(SLOTTED))
def test_slot_tokens_replace_the_region_summaries(kind, tmp_path):
    encoder = create_encoder(kind, **SLOTTED[kind])
    plain = create_encoder(kind, **TINY[kind])
    regions = encoder.region_layout()[1]
    assert encoder.object_slots == SLOTTED[kind]["slots"] and plain.object_slots == 0
    assert encoder.num_tokens == regions * encoder.object_slots
    assert not any(name.startswith("slots.") for name, _ in plain.named_parameters())
    frames = [make_frame(0), make_frame(1)]
    tokens = encoder.encode(frames)
    assert tokens.shape == (2, encoder.num_tokens, encoder.dim)
    assert torch.allclose(encoder.encode(frames[:1]), tokens[:1], atol=1e-5)  # per frame
    per_slot = tokens[0].reshape(regions, encoder.object_slots, -1)
    assert not torch.allclose(per_slot[:, 0], per_slot[:, 1], atol=1e-4)  # slots differ
    encoder.save(tmp_path / "enc")
    again = load_encoder(tmp_path / "enc")
    assert again.object_slots == encoder.object_slots
    assert torch.equal(again.encode(frames), tokens)
    with pytest.raises(ValueError, match="slots"):
        create_encoder(kind, **{**TINY[kind], "slots": -1})


def test_slot_targets_name_each_regions_objects_nearest_first():
    near = ObjectAnnotation("car", (8.0, 0.5, 0.0), (1.8, 4.5, 1.5), 0.0, "stopped")
    far = ObjectAnnotation("bus", (30.0, 1.0, 0.0), (2.5, 11.0, 3.0), 0.0, "moving")
    cone = ObjectAnnotation("traffic cone", (15.0, 0.2, 0.0), (0.4, 0.4, 0.7), 0.0)
    behind = ObjectAnnotation("pedestrian", (-12.0, 0.0, 0.0), (0.6, 0.5, 1.7), 0.0,
                              "standing")
    frame = _frame_with([far, cone, behind, near])
    targets = slot_targets([frame], "views", 6, slots=4)[0]  # (6, 4, fields)
    front = targets[CAMERA_VIEWS.index("CAM_FRONT")]
    names = list(OBJECT_FIELDS)
    assert [CLASS_NAMES[c] for c in front[:3, 0]] == ["car", "traffic cone", "bus"]
    assert front[3, 0] == len(CLASS_NAMES) and (front[3, 1:] == IGNORE).all()  # nothing
    assert STATUS_NAMES[front[0, names.index("status")]] == "stopped"
    assert front[1, names.index("status")] == len(STATUS_NAMES)  # a cone has no status
    assert list(front[:3, names.index("ring")]) == [0, 1, 2]  # 8 m, 15 m, 30 m
    assert RELATIONS[front[0, names.index("sector")]] == "front"
    back = targets[CAMERA_VIEWS.index("CAM_BACK")]
    assert CLASS_NAMES[back[0, 0]] == "pedestrian"
    assert RELATIONS[back[0, names.index("sector")]] == "back"
    assert (targets[..., 0] < len(CLASS_NAMES)).sum() == 4  # each object once (no overlaps)
    # Only the nearest objects get a slot.
    assert [CLASS_NAMES[c] for c in slot_targets([frame], "views", 6, 1)[0, 0, :, 0]] == ["car"]
    bands = slot_targets([frame], "bands", 8, slots=2)[0]
    ahead = bands[3]  # just left of straight ahead: all three, but only two slots
    assert [CLASS_NAMES[c] for c in ahead[:, 0]] == ["car", "traffic cone"]
    assert (bands[..., 0] < len(CLASS_NAMES)).sum() == 3
    # Descriptions say the same, slot by slot.
    words = slot_descriptions(frame, "views", 6, slots=4)
    assert words[CAMERA_VIEWS.index("CAM_FRONT") * 4:][:4] == [
        "stopped car front", "traffic cone front", "moving bus front", "nothing"]
    assert len(words) == 24


def test_a_slot_encoder_describes_each_slot_by_its_own_object():
    frame = make_frame(3)
    encoder = create_encoder("camera-vit", **SLOTTED["camera-vit"])
    assert encoder.describe_tokens(frame) == slot_descriptions(frame, "views", 6, 2)
    plain = create_encoder("camera-vit", **TINY["camera-vit"])
    described = plain.describe_tokens(frame)
    assert described[0] == described[1]  # region summaries: one description per view


def test_pretraining_trains_the_slots_and_reports_their_accuracy(world, tmp_path):
    kind = "lidar-rangevit"
    config = PretrainConfig(epochs=2, batch_size=4, encoder=SLOTTED[kind])
    encoder = ensure_pretrained(kind, world, tmp_path, config, progress=False)
    fresh = create_encoder(kind, **SLOTTED[kind])
    trained = dict(encoder.named_parameters())
    for name, param in fresh.named_parameters():
        if name.startswith("slots."):
            assert not torch.equal(param, trained[name]), name  # gradients reached the slots
    record = json.loads((encoder_dir(kind, tmp_path) / RECORD_FILE).read_text())
    for light in ("day", "night"):
        accuracy = record["val"][light]["slot_accuracy"]
        assert set(accuracy) == set(OBJECT_FIELDS)
        assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    assert record["encoder_config"]["slots"] == 3
    assert np.isfinite(record["final_train_loss"])


#: Fingerprints of the tiny configs as computed before object slots existed (commit f825a7f).
FINGERPRINTS_BEFORE_SLOTS = {
    "camera-vit": "6de2c15489f2e2e41eab26cf294c2f9d0d45da1ee56d9e005c596bed7ab9da1f",
    "lidar-rangevit": "7c856962d12f6b3478c4c1fe47d5235f84cfa51df5a2f22838691e94d1471c6d",
}


@pytest.mark.parametrize("kind", sorted(FINGERPRINTS_BEFORE_SLOTS))
def test_encoders_without_slots_keep_their_fingerprints(kind):
    """Day states and feature caches are keyed on encoder fingerprints: adding the slot
    fields to the configs must not invalidate every store prepared before them."""
    plain = create_encoder(kind, **TINY[kind])
    assert plain.fingerprint() == FINGERPRINTS_BEFORE_SLOTS[kind]
    slotted = create_encoder(kind, **SLOTTED[kind])
    assert slotted.fingerprint() != plain.fingerprint()
    layers = create_encoder(kind, **{**SLOTTED[kind], "slot_layers": 1})
    assert layers.fingerprint() != slotted.fingerprint()
