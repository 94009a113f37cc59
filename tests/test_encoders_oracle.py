"""The oracle encoder: ground-truth objects as tokens (a diagnostic, never a served sensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_encoders import make_frame

from encoders import create_encoder
from encoders.oracle import FEATURE_NAMES
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


def test_frames_without_ground_truth_are_refused():
    frame = make_frame(2)
    frame.objects = None
    with pytest.raises(ValueError, match="no ground-truth objects"):
        create_encoder("oracle").encode([frame])


def test_the_daemon_never_serves_the_oracle():
    assert create_encoder("oracle").modality == "oracle"
    assert "oracle" not in known_modalities()
