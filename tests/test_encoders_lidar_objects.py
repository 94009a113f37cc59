"""The LiDAR object encoder: segmentation, segment-to-object matching, targets, light."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders import create_encoder
from encoders.lidar_objects import (
    FEATURES,
    LidarObjectsConfig,
    _components,
    match_segments,
    segment_features,
    segment_sweep,
)
from encoders.pretrain import encode_inputs
from encoders.targets import IGNORE, OBJECT_FIELDS
from scenes.layout import CLASS_NAMES
from scenes.lidar import LIDAR_HEIGHT
from scenes.sample import ObjectAnnotation
from scenes.synthetic import SyntheticWorld, WorldConfig


def _box_points(center, size, step=0.05) -> np.ndarray:
    """Returns on the near (-x) face of an axis-aligned box, in the sensor frame."""
    cx, cy, cz = center
    w, _, h = size
    ys = np.arange(cy - w / 2, cy + w / 2, step)
    zs = np.arange(cz - h / 2, cz + h / 2, step)
    y, z = np.meshgrid(ys, zs)
    x = np.full_like(y, cx - size[1] / 2)
    pts = np.stack([x.ravel(), y.ravel(), z.ravel() - LIDAR_HEIGHT, np.full(y.size, 0.5)], 1)
    return pts.astype(np.float32)


def test_components_match_a_breadth_first_search():
    rng = np.random.default_rng(0)
    n = 200
    a, b = rng.integers(0, n, 150), rng.integers(0, n, 150)
    root = _components(n, a, b)
    adjacency = [[] for _ in range(n)]
    for i, j in zip(a, b):
        adjacency[i].append(j)
        adjacency[j].append(i)
    for start in range(n):
        seen, todo = {start}, [start]
        while todo:
            for j in adjacency[todo.pop()]:
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        assert root[start] == min(seen)


def test_two_boxes_make_two_segments_nearest_first_and_ground_is_dropped():
    config = LidarObjectsConfig()
    near = _box_points((8.0, -3.0, 0.8), (1.8, 4.5, 1.5))
    far = _box_points((15.0, 4.0, 0.8), (1.8, 4.5, 1.5))
    ground = np.stack([np.linspace(3, 20, 50), np.zeros(50), np.full(50, -LIDAR_HEIGHT),
                       np.full(50, 0.1)], 1).astype(np.float32)
    points = np.concatenate([far, ground, near])
    labels = segment_sweep(points, config)
    low = points[:, 2] + LIDAR_HEIGHT < config.ground_height
    assert set(labels[len(far):len(far) + len(ground)]) == {-1}
    assert set(labels[low]) == {-1}
    n_far = len(far)
    assert set(labels[n_far + len(ground):][~low[n_far + len(ground):]]) == {0}  # nearer: 0
    assert set(labels[:n_far][~low[:n_far]]) == {1}
    feats = segment_features(points, labels, 3, config)
    x, y, present = (FEATURES.index(k) for k in ("x", "y", "present"))
    assert feats[0, x] * config.scale == pytest.approx(8.0 - 2.25, abs=0.05)
    assert feats[0, y] * config.scale == pytest.approx(-3.0, abs=0.1)
    assert feats[:2, present].tolist() == [1.0, 1.0] and not feats[2].any()


def test_a_split_object_belongs_to_its_largest_fragment_only():
    car = ObjectAnnotation("car", (10.0, 0.0, 0.8), (1.8, 4.5, 1.5), 0.0, "parked")
    big = _box_points((10.0, 0.3, 0.8), (1.2, 4.5, 1.5))
    small = _box_points((10.0, -0.7, 0.8), (0.3, 4.5, 1.5))
    points = np.concatenate([big, small])
    labels = np.concatenate([np.zeros(len(big), int), np.ones(len(small), int)])
    wall = _box_points((30.0, 0.0, 2.0), (3.0, 0.2, 3.0))
    points = np.concatenate([points, wall])
    labels = np.concatenate([labels, np.full(len(wall), 2)])
    assert match_segments(points, labels, 4, [car]) == [car, None, None, None]


@pytest.fixture(scope="module")
def world_frames():
    world = SyntheticWorld(WorldConfig(image_height=24, image_width=40))
    day = [world.make_frame(f"day-{i:04d}", 0, 0.9)[0] for i in range(3)]
    night = [world.make_frame(f"day-{i:04d}", 0, 0.1)[0] for i in range(3)]
    return day, night


def test_most_annotated_objects_get_a_token(world_frames):
    encoder = create_encoder("lidar-objects")
    found = total = 0
    for frame in world_frames[0]:
        shown = [o for o in encoder.token_objects(frame) if o is not None]
        assert len({id(o) for o in shown}) == len(shown)  # each object at most once
        found += len(shown)
        total += len(frame.objects)
    assert found >= 0.8 * total


def test_targets_and_descriptions_follow_the_tokens(world_frames):
    encoder = create_encoder("lidar-objects")
    frame = world_frames[0][0]
    targets = encoder.slot_targets([frame])
    assert targets.shape == (1, 1, encoder.num_tokens, len(OBJECT_FIELDS))
    words = encoder.describe_tokens(frame)
    assert len(words) == encoder.num_tokens
    for obj, target, text in zip(encoder.token_objects(frame), targets[0, 0], words):
        if obj is None:
            assert target[0] == len(CLASS_NAMES) and (target[1:] == IGNORE).all()
            assert text == "nothing"
        else:
            assert CLASS_NAMES[target[0]] == obj.category and obj.category in text
    # pretraining reads the same targets through the encoder
    _, _, slots, _ = encode_inputs(encoder, _Frames([frame]), max_count=3)
    assert torch.equal(slots, torch.from_numpy(targets))


class _Frames:
    """The two things :func:`encode_inputs` reads of a dataset."""

    def __init__(self, frames):
        self._frames = {f.frame_id: f for f in frames}
        self.frame_ids = list(self._frames)

    def frame(self, frame_id):
        return self._frames[frame_id]


def test_night_changes_no_token(world_frames):
    encoder = create_encoder("lidar-objects", max_segments=16).freeze()
    day, night = world_frames
    assert torch.equal(encoder.encode(day), encoder.encode(night))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="max_segments"):
        LidarObjectsConfig(max_segments=0)
    with pytest.raises(ValueError, match="divisible"):
        LidarObjectsConfig(embed_dim=10, num_heads=4)
