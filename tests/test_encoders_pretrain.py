"""Pretraining, reuse from the model store, probes and the CLI, on a tiny generated world."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_encoders import TINY

from encoders import create_encoder
from encoders.base import WEIGHTS_FILE
from encoders.pretrain import (
    RECORD_FILE,
    PretrainConfig,
    encoder_dir,
    ensure_pretrained,
    stored_or_pretrained,
)
from encoders.probe import ProbeConfig, probe_encoder, to_markdown
from encoders.targets import TARGET_NAMES, band_of, frame_class_counts, region_counts
from scenes.sample import CAMERA_VIEWS, Frame, ObjectAnnotation
from scenes.synthetic import WorldConfig, generate_world

WORLD = dict(day_frames=12, night_frames=9, frames_per_scene=3, questions_per_frame=2,
             image_height=16, image_width=32, lidar_width=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(WorldConfig(**WORLD), tmp_path_factory.mktemp("world"), progress=False)


def tiny_pretrain(kind: str) -> PretrainConfig:
    # The camera pretrains on a (tiny) corpus of its own, the LiDAR on the world's train split.
    corpus = dict(day_frames=4, night_frames=2, frames_per_scene=2, questions_per_frame=1) \
        if kind == "camera-vit" else None
    return PretrainConfig(epochs=1, batch_size=4, encoder=TINY[kind], corpus=corpus)


def _frame_with(objects: list[ObjectAnnotation]) -> Frame:
    cams = {v: np.zeros((4, 4, 3), np.uint8) for v in CAMERA_VIEWS}
    return Frame.from_rig("f", "s", 0.0, 1.0, cams, np.zeros((0, 4), np.float32), objects)


def test_region_targets_follow_object_positions():
    ahead = ObjectAnnotation("car", (10.0, 0.0, 0.0), (1.8, 4.5, 1.5), 0.0, "stopped")
    behind = ObjectAnnotation("pedestrian", (-25.0, 0.5, 0.0), (0.6, 0.5, 1.7), 0.0,
                              "standing")
    left = ObjectAnnotation("car", (0.0, 35.0, 0.0), (1.8, 4.5, 1.5), 0.0)
    frame = _frame_with([ahead, behind, left])
    views = region_counts([frame], "views")[0]  # (6, Q)
    car, ped = TARGET_NAMES.index("car"), TARGET_NAMES.index("pedestrian")
    assert views[CAMERA_VIEWS.index("CAM_FRONT"), car] == 1
    assert views[CAMERA_VIEWS.index("CAM_BACK"), ped] == 1
    assert views[CAMERA_VIEWS.index("CAM_BACK_LEFT"), car] == 1  # 90 deg left: back-left view
    assert views[:, TARGET_NAMES.index("objects within 0-10 m")].sum() == 1
    assert views[CAMERA_VIEWS.index("CAM_FRONT"), TARGET_NAMES.index("status stopped")] == 1
    assert views[CAMERA_VIEWS.index("CAM_BACK"), TARGET_NAMES.index("status standing")] == 1
    assert views[:, TARGET_NAMES.index("status parked")].sum() == 0  # the left car has none
    bands = region_counts([frame], "bands", bands=8)[0]
    assert bands[band_of(0.0, 8), car] == 1 and band_of(0.0, 8) == 4  # ahead: middle columns
    assert bands[band_of(math.pi - 0.02, 8), ped] == 1 and band_of(math.pi - 0.02, 8) == 0
    assert frame_class_counts([frame])[0, 0] == 2  # two cars
    near = region_counts([frame], "views", max_distance=20.0)[0]
    assert near[:, car].sum() == 1 and near[:, ped].sum() == 0  # the pedestrian is 25 m away
    many = _frame_with([ahead] * 7)
    assert region_counts([many], "views", max_count=3).max() == 3
    with pytest.raises(ValueError, match="no ground-truth objects"):
        region_counts([_frame_with(None)], "views")


@pytest.mark.parametrize("kind", ["camera-vit", "lidar-rangevit"])
def test_pretrain_saves_frozen_and_is_reused(kind, world, tmp_path):
    config = tiny_pretrain(kind)
    encoder = ensure_pretrained(kind, world, tmp_path, config, progress=False)
    assert all(not p.requires_grad for p in encoder.parameters()) and not encoder.training
    fresh = create_encoder(kind, **TINY[kind])
    assert encoder.fingerprint() != fresh.fingerprint()  # it trained
    record = json.loads((encoder_dir(kind, tmp_path) / RECORD_FILE).read_text())
    assert record["fingerprint"] == encoder.fingerprint()
    assert set(record["val"]) == {"day", "night"}
    if kind == "camera-vit":  # the corpus went to the store, sized like the world's frames
        corpus = next((tmp_path / "worlds").glob("pretrain-*"))
        assert record["train_frames"] == 6 and record["corpus"] == str(corpus)
    weights = encoder_dir(kind, tmp_path) / WEIGHTS_FILE
    stamp = weights.stat().st_mtime_ns
    again = ensure_pretrained(kind, world, tmp_path, config, progress=False)
    assert weights.stat().st_mtime_ns == stamp  # reused, not retrained
    assert again.fingerprint() == encoder.fingerprint()
    retrained = ensure_pretrained(kind, world, tmp_path, replace(config, lr=5e-4),
                                  progress=False)
    assert retrained.fingerprint() != encoder.fingerprint()  # another config: trained again
    encoder = ensure_pretrained(kind, world, tmp_path, config, progress=False)
    weights.write_bytes(b"corrupt")
    repaired = ensure_pretrained(kind, world, tmp_path, config, progress=False)
    assert repaired.fingerprint() == encoder.fingerprint()  # retrained, deterministically


def test_probe_and_export_use_the_stored_encoder_whatever_config_made_it(world, tmp_path):
    """`mpnp encoders pretrain --epochs 10` then `mpnp encoders probe` must probe those
    weights, not silently pretrain again with the defaults (it did)."""
    kind = "lidar-rangevit"
    encoder = ensure_pretrained(kind, world, tmp_path, replace(tiny_pretrain(kind), lr=5e-4),
                                progress=False)
    weights = encoder_dir(kind, tmp_path) / WEIGHTS_FILE
    stamp = weights.stat().st_mtime_ns
    stored = stored_or_pretrained(kind, world, tmp_path, progress=False)
    assert stored.fingerprint() == encoder.fingerprint()
    assert weights.stat().st_mtime_ns == stamp  # nothing retrained
    weights.write_bytes(b"corrupt")  # unreadable: falls back to pretraining (the defaults)
    with pytest.MonkeyPatch.context() as mp:
        called = []
        mp.setattr("encoders.pretrain.ensure_pretrained",
                   lambda *a, **k: called.append(a) or encoder)
        assert stored_or_pretrained(kind, world, tmp_path, progress=False) is encoder
    assert called and called[0][0] == kind


def test_pretrain_needs_a_world(tmp_path):
    with pytest.raises(FileNotFoundError, match="mpnp scenes generate"):
        ensure_pretrained("lidar-rangevit", tmp_path / "none", tmp_path, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        PretrainConfig(epochs=0)


def test_probe_reports_day_and_night(world, tmp_path):
    kind = "lidar-rangevit"
    encoder = ensure_pretrained(kind, world, tmp_path, tiny_pretrain(kind), progress=False)
    report = probe_encoder(encoder, world, ProbeConfig(steps=20, weight_decays=(0.1,)),
                           progress=False)
    presence = report["tasks"]["class presence"]
    assert {"day", "night"} <= set(presence) and report["regions"] == "bands"
    for light in ("day", "night"):
        assert 0.0 <= presence[light]["accuracy"] <= 1.0
        assert len(presence[light]["per_target"]) == 10
    assert set(report["tasks"]) == {"class presence", "class presence <= 20 m",
                                    "shape-group count", "objects by distance", "status count",
                                    "nearest object class", "nearest object status",
                                    "nearest object direction"}
    text = to_markdown({"world": str(world), "encoders": [report]})
    assert "| lidar-rangevit | night |" in text


def test_cli_lists_and_pretrains(world, tmp_path, capsys):
    from mpnp.cli import main

    assert main(["encoders", "list", "--store", str(tmp_path)]) == 0
    assert "camera-vit" in capsys.readouterr().out
    assert main(["encoders", "pretrain", "--kind", "radar", "--store", str(tmp_path),
                 "--world", str(world)]) == 1
    assert "known: camera-vit" in capsys.readouterr().err


def test_balanced_accuracy_ignores_the_prior():
    from encoders.probe import balanced_accuracy

    targets = torch.tensor([[0], [0], [0], [1]])
    assert balanced_accuracy(torch.zeros_like(targets), targets) == 0.5  # majority: 0.75 acc
    assert balanced_accuracy(targets.clone(), targets) == 1.0
    assert balanced_accuracy(torch.tensor([[0], [0], [1], [1]]), targets) == pytest.approx(5 / 6)


def test_relit_test_frames_change_only_the_light(world):
    from encoders.probe import relit_test_frames
    from scenes.dataset import QADataset

    relit = relit_test_frames(world, {"day": 1.0, "night": 0.05})
    stored = QADataset.load(world, "test")
    assert [f.frame_id for f in relit["day"]] == stored.frame_ids
    day, night = relit["day"][0], relit["night"][0]
    assert day.light == 1.0 and night.is_night
    assert np.array_equal(day.lidar, night.lidar) and day.objects == night.objects
    assert day.cameras["CAM_FRONT"].mean() > night.cameras["CAM_FRONT"].mean()
