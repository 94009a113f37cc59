"""The oracle encoder: ground-truth objects as tokens (a diagnostic, never a served sensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_encoders import make_frame

from encoders import create_encoder
from encoders.oracle import FEATURE_NAMES, SUMMARY_FEATURES, SUMMARY_FILTERS, describe_scene
from policies.context import known_modalities
from scenes.sample import ObjectAnnotation


def _feature(tokens: torch.Tensor, row: int, name: str) -> float:
    return float(tokens[row, FEATURE_NAMES.index(name)])


def test_tokens_hold_the_objects_nearest_first():
    frame = make_frame(0)
    frame.objects = [
        ObjectAnnotation("bus", (-20.0, 0.0, 1.6), (2.8, 11.0, 3.2), np.pi, "moving"),
        ObjectAnnotation("traffic cone", (3.0, 3.0, 0.4), (0.5, 0.5, 0.8), 0.0, None),
        ObjectAnnotation("pedestrian", (0.0, -8.0, 0.9), (0.6, 0.5, 1.8), 0.0, "standing"),
    ]
    oracle = create_encoder("oracle", max_objects=4, scale=20.0)
    tokens = oracle.encode([frame])[0]
    assert tokens.shape == (4, len(FEATURE_NAMES))
    # Nearest first: the cone (4.2 m), the pedestrian (8 m), the bus (20 m), one empty slot.
    assert _feature(tokens, 0, "class=traffic cone") == 1.0
    assert _feature(tokens, 0, "status=none") == 1.0
    assert _feature(tokens, 0, "sector=front left") == 1.0
    assert _feature(tokens, 1, "class=pedestrian") == 1.0
    assert _feature(tokens, 1, "status=standing") == 1.0
    assert _feature(tokens, 1, "sector=back right") == 1.0 or \
        _feature(tokens, 1, "sector=front right") == 1.0  # exactly to the right: a boundary
    assert _feature(tokens, 2, "class=bus") == 1.0 and _feature(tokens, 2, "sector=back") == 1.0
    assert _feature(tokens, 2, "x") == pytest.approx(-1.0)
    assert _feature(tokens, 2, "status=moving") == 1.0
    assert [_feature(tokens, r, "present") for r in range(4)] == [1.0, 1.0, 1.0, 0.0]
    assert torch.count_nonzero(tokens[3]) == 0
    # Every present token has exactly one class, one status and one sector.
    for prefix in ("class=", "status=", "sector="):
        cols = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith(prefix)]
        assert tokens[:3, cols].sum(1).tolist() == [1.0, 1.0, 1.0]


def test_more_objects_than_tokens_keeps_the_nearest_and_night_changes_nothing():
    frame = make_frame(1)
    frame.objects = [ObjectAnnotation("car", (float(d), 0.0, 0.8), (1.9, 4.5, 1.6), 0.0,
                                      "parked") for d in (30, 10, 20, 40, 5)]
    oracle = create_encoder("oracle", max_objects=3)
    tokens = oracle.encode([frame])[0]
    xs = tokens[:, FEATURE_NAMES.index("x")] * oracle.config.scale
    torch.testing.assert_close(xs, torch.tensor([5.0, 10.0, 20.0]))
    frame.light = 0.0
    assert torch.equal(oracle.encode([frame])[0], tokens)


def test_summary_tokens_answer_each_whole_scene_filter_in_one_token():
    frame = make_frame(2)
    frame.objects = [ObjectAnnotation("car", (float(5 + d), 2.0, 0.8), (1.9, 4.5, 1.6), 0.0,
                                      status) for d, status in
                     enumerate(["parked", "parked", "moving"] + ["parked"] * 10)]
    frame.objects.append(ObjectAnnotation("pedestrian", (0.0, 4.0, 0.9), (0.6, 0.5, 1.8), 0.0,
                                          "standing"))
    oracle = create_encoder("oracle", max_objects=4, summaries=True)
    tokens = oracle.encode([frame])[0]
    names = FEATURE_NAMES + SUMMARY_FEATURES
    assert tokens.shape == (4 + len(SUMMARY_FILTERS), len(names)) == (oracle.num_tokens,
                                                                       oracle.dim)
    assert (tokens[:4, len(FEATURE_NAMES):] == 0).all()  # object tokens: no summary part

    def row(cat, status):
        return tokens[4 + SUMMARY_FILTERS.index((cat, status))]

    def count(r):
        return int(sum(float(r[names.index(f"count>={k}")]) for k in range(1, 11)))

    # Counts cover every object (the 14 > max_objects), clipped at 10 as the questions are.
    assert count(row("car", None)) == 10 and count(row("car", "moving")) == 1
    assert count(row("car", "stopped")) == 0 and count(row("bus", None)) == 0
    assert count(row(None, "standing")) == 1 and count(row(None, "parked")) == 10
    car = row("car", None)
    assert float(car[names.index("share status=moving")]) == pytest.approx(1 / 13)
    assert float(car[names.index("share status=parked")]) == pytest.approx(12 / 13)
    assert float(car[names.index("class=car")]) == 1.0 and float(car[names.index("summary")]) == 1
    standing = row(None, "standing")
    assert float(standing[names.index("share class=pedestrian")]) == 1.0
    assert float(standing[names.index("status=standing")]) == 1.0
    assert sum(float(standing[names.index(f"class={c}")]) for c in ("car", "pedestrian")) == 0


def test_the_scene_in_words_lists_the_objects_nearest_first():
    frame = make_frame(3)
    frame.objects = [
        ObjectAnnotation("bus", (-20.0, 0.0, 1.6), (2.8, 11.0, 3.2), np.pi, "moving"),
        ObjectAnnotation("traffic cone", (3.0, 3.0, 0.4), (0.5, 0.5, 0.8), 0.0, None),
        ObjectAnnotation("bicycle", (5.0, -5.0, 0.5), (0.6, 1.8, 1.2), 0.0, "with rider"),
    ]
    assert describe_scene(frame) == ("objects: traffic cone front left, with rider bicycle "
                                     "front right, moving bus back.")
    assert describe_scene(frame, max_objects=1) == "objects: traffic cone front left."


def test_frames_without_ground_truth_are_refused():
    frame = make_frame(2)
    frame.objects = None
    with pytest.raises(ValueError, match="no ground-truth objects"):
        create_encoder("oracle").encode([frame])


def test_the_daemon_never_serves_the_oracle():
    assert create_encoder("oracle").modality == "oracle"
    assert "oracle" not in known_modalities()
