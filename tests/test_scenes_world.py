"""The synthetic world: determinism, sensors, light, ray-cast geometry, questions."""

from __future__ import annotations

import numpy as np
import pytest

from mpnp.answers import ANSWER_VOCAB, QUESTION_TYPES
from scenes import layout as L
from scenes.lidar import LIDAR_HEIGHT, beam_directions, cast_lidar
from scenes.questions import SceneGraph, candidate_pool, noun_phrase
from scenes.range_image import points_to_range_image
from scenes.raycast import ROAD, SIDEWALK, boxes_to_arrays, intersect_boxes, intersect_environment
from scenes.sample import CAMERA_VIEWS, ObjectAnnotation
from scenes.synthetic import SyntheticWorld, WorldConfig

SMALL = dict(image_height=24, image_width=40, lidar_width=128)


def _empty_scene(objects: list[L.WorldObject], ego_speed: float = 0.0) -> L.SceneLayout:
    return L.SceneLayout("test", objects, ego_speed, np.zeros(50), np.zeros(50),
                         np.zeros((2, 50, 3)), 0, -25)


def _box(category: str, x: float, y: float, size=(2.0, 4.0, 1.5), yaw=0.0, status=None):
    return L.WorldObject(category, status, np.array([x, y, size[2] / 2]), np.array(size), yaw,
                         0.0, np.array([0.5, 0.5, 0.5]), False)


@pytest.mark.parametrize("bad", [
    dict(day_frames=-1), dict(day_frames=0, night_frames=0), dict(image_height=4),
    dict(train_fraction=0.9, val_fraction=0.2), dict(night_light=(0.5, 0.2)),
    dict(questions_per_frame=0), dict(lidar_width=8), dict(density=0.0),
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="WorldConfig"):
        WorldConfig(**bad)


def test_frames_and_questions_are_deterministic_from_the_seed():
    a, qa = SyntheticWorld(WorldConfig(seed=3, **SMALL)).make_frame("day-0001", 2, 0.8)
    b, qb = SyntheticWorld(WorldConfig(seed=3, **SMALL)).make_frame("day-0001", 2, 0.8)
    c, _ = SyntheticWorld(WorldConfig(seed=4, **SMALL)).make_frame("day-0001", 2, 0.8)
    for view in CAMERA_VIEWS:
        np.testing.assert_array_equal(a.cameras[view], b.cameras[view])
    np.testing.assert_array_equal(a.lidar, b.lidar)
    assert [(q.question, q.answer) for q in qa] == [(q.question, q.answer) for q in qb]
    assert a.objects == b.objects
    assert a.lidar.shape != c.lidar.shape or not np.array_equal(a.lidar, c.lidar)


def test_frame_is_well_formed_and_questions_use_the_vocabulary():
    world = SyntheticWorld(WorldConfig(questions_per_frame=10, **SMALL))
    types = set()
    for index in range(3):
        frame, questions = world.make_frame("day-0002", index, 1.0)
        frame.validate()
        assert frame.cameras["CAM_FRONT"].shape == (24, 40, 3)
        assert frame.lidar.dtype == np.float32 and frame.lidar.shape[1] == 4
        assert 5 <= len(frame.objects) and len(questions) == 10
        for q in questions:
            assert q.answer in ANSWER_VOCAB, q
            assert q.num_hop in (0, 1) and q.frame_id == frame.frame_id
            types.add(q.template_type)
    assert types == set(QUESTION_TYPES)


def test_lidar_ignores_light_while_night_darkens_and_blurs_the_camera():
    world = SyntheticWorld(WorldConfig(**SMALL))
    day, _ = world.make_frame("day-0003", 1, 1.0)
    night, _ = world.make_frame("day-0003", 1, 0.03)
    np.testing.assert_array_equal(day.lidar, night.lidar)
    day_img = np.stack([day.cameras[v] for v in CAMERA_VIEWS]).astype(np.float64)
    night_img = np.stack([night.cameras[v] for v in CAMERA_VIEWS]).astype(np.float64)
    assert night_img.mean() < 0.5 * day_img.mean()
    # The night view keeps little of the day view's appearance (noise, blur, darkness),
    # while a slightly dimmer day keeps nearly all of it.
    dim, _ = world.make_frame("day-0003", 1, 0.8)
    dim_img = np.stack([dim.cameras[v] for v in CAMERA_VIEWS]).astype(np.float64)
    assert np.corrcoef(day_img.ravel(), dim_img.ravel())[0, 1] > 0.9
    assert np.corrcoef(day_img.ravel(), night_img.ravel())[0, 1] < 0.5
    # Most of the night view is dark; only lights and the headlight cone stay bright.
    assert np.median(night_img) < 0.35 * np.median(day_img)


def test_slab_intersection_hits_a_box_at_its_distance():
    centers, half, yaws = boxes_to_arrays([(10.0, 0.0, 1.0)], [(2.0, 4.0, 2.0)], [0.0])
    dirs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    hits = intersect_boxes(np.array([0.0, 0.0, 1.0]), dirs, centers, half, yaws)
    assert hits.t[0] == pytest.approx(8.0)  # front at x = 10 - length/2
    assert hits.face[0] == 1  # the ray enters through the box's rear face
    assert hits.index.tolist() == [0, -1, -1]
    # Turned by 90 degrees, the box shows its side: now its width is along x.
    _, _, yaws = boxes_to_arrays([(10.0, 0.0, 1.0)], [(2.0, 4.0, 2.0)], [np.pi / 2])
    hits = intersect_boxes(np.array([0.0, 0.0, 1.0]), dirs[:1], centers, half, yaws)
    assert hits.t[0] == pytest.approx(9.0)
    assert hits.face[0] in (2, 3)


def test_lidar_returns_points_on_a_box_at_known_range():
    scene = _empty_scene([_box("car", 12.0, 0.0, size=(2.0, 4.0, 2.5))])
    sweep = cast_lidar(scene, 0.0, np.random.default_rng(0), beams=32, width=256)
    assert sweep.hits_per_object.tolist()[0] > 5
    pts = sweep.points
    forward = (np.abs(np.arctan2(pts[:, 1], pts[:, 0])) < 0.05) & (pts[:, 2] > -1.0)
    assert forward.any()
    np.testing.assert_allclose(pts[forward, 0], 10.0, atol=0.1)  # rear face at x = 12 - 2
    # Range image of the sweep: one return per pixel, rows as the beams.
    image = points_to_range_image(pts, beams=32, width=256, normalize=False)
    assert (image[0] > 0).sum() == len(pts)


def test_environment_ray_cast_hits_road_and_sidewalk_planes():
    scene = _empty_scene([])
    origin = np.array([0.0, 0.0, LIDAR_HEIGHT])
    pitch = np.radians(-30.0)
    down_front = np.array([[np.cos(pitch), 0.0, np.sin(pitch)]])
    env = intersect_environment(origin, down_front, 0.0, scene, 70.0)
    assert env.material[0] == ROAD
    assert env.t[0] == pytest.approx(LIDAR_HEIGHT / np.sin(-pitch))
    pitch = np.radians(-8.0)
    right = np.array([[0.0, -np.cos(pitch), np.sin(pitch)]])
    env = intersect_environment(origin, right, 0.0, scene, 70.0)
    assert env.material[0] == SIDEWALK
    assert env.point[0, 2] == pytest.approx(L.KERB_HEIGHT)
    assert beam_directions(32, 64).shape == (32 * 64, 3)


def test_questions_follow_the_scene_graph():
    objects = [
        ObjectAnnotation("car", (10.0, 0.0, 0.8), (1.9, 4.5, 1.6), 0.0, "parked"),
        ObjectAnnotation("car", (20.0, 0.0, 0.8), (1.9, 4.5, 1.6), 0.0, "parked"),
        ObjectAnnotation("pedestrian", (10.0, -5.0, 0.9), (0.6, 0.5, 1.8), 0.0, "standing"),
        ObjectAnnotation("bus", (-15.0, 3.5, 1.6), (2.8, 11.0, 3.2), 0.0, "moving"),
    ]
    pool = {c.question: c.answer for c in candidate_pool(objects)}
    assert pool["Are there any cars?"] == "yes"
    assert pool["Are there any trucks?"] == "no"
    assert pool["How many parked cars are there?"] == "2"
    assert pool["What status is the car?"] == "parked"
    assert pool["What is the moving thing?"] == "bus"
    # Only pedestrians stand, so "the standing thing" would give its answer away.
    assert "What is the standing thing?" not in pool
    assert pool["Is the number of cars greater than the number of buses?"] == "yes"
    # Seen from the bus (behind, in the other lane) everything else is to its front.
    assert pool["How many things are to the front of the bus?"] == "3"
    assert pool["What is the thing that is to the back of the pedestrian?"] == "bus"
    graph = SceneGraph(objects)
    assert {r[1] for r in graph.references()} == {"the pedestrian", "the bus"}
    assert noun_phrase("bicycle", "with rider", True) == "bicycles with riders"
    assert noun_phrase(None, "not standing", False) == "thing that is not standing"
