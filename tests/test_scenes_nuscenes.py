"""The nuScenes-QA loader on a tiny nuScenes-format dataset written by the test itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scenes.dataset import QADataset
from scenes.nuscenes_qa import NuScenesTables, load_nuscenes_qa, split_scenes
from scenes.sample import CAMERA_VIEWS, LIDAR
from scenes.storage import DatasetFormatError

VERSION = "v1.0-mini"
# Two day and two night nuScenes-mini scenes, plus one scene outside the mini split.
SCENES = [("scene-0061", "Parked cars, peds"), ("scene-0553", "Wait at intersection"),
          ("scene-1077", "Night, big street"), ("scene-1094", "Night, after rain"),
          ("scene-0001", "Not a mini scene")]
SAMPLES_PER_SCENE = 2
IMAGE_HW = (9, 16)


def _write(root: Path, name: str, rows: list[dict]) -> None:
    (root / VERSION / f"{name}.json").write_text(json.dumps(rows))


def _yaw_quaternion(yaw: float) -> list[float]:
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def make_tiny_nuscenes(root: Path) -> dict:
    """Write tables, images, sweeps and questions; return what the test needs to check."""
    (root / VERSION).mkdir(parents=True)
    rng = np.random.default_rng(0)
    channels = [*CAMERA_VIEWS, LIDAR]
    sensors = [{"token": f"sensor-{c}", "channel": c,
                "modality": "lidar" if c == LIDAR else "camera"} for c in channels]
    calibrated = [{"token": f"cs-{c}", "sensor_token": f"sensor-{c}", "translation": [0, 0, 1.8],
                   "rotation": [1, 0, 0, 0], "camera_intrinsic": []} for c in channels]
    logs = [{"token": "log-0", "logfile": "log", "vehicle": "n015", "date_captured": "2018",
             "location": "singapore-onenorth"}]
    maps = [{"token": "map-0", "log_tokens": ["log-0"], "category": "semantic_prior",
             "filename": "maps/none.png"}]
    categories = [{"token": "cat-car", "name": "vehicle.car", "description": ""},
                  {"token": "cat-ped", "name": "human.pedestrian.adult", "description": ""},
                  {"token": "cat-animal", "name": "animal", "description": ""}]
    attributes = [{"token": "att-parked", "name": "vehicle.parked", "description": ""},
                  {"token": "att-standing", "name": "pedestrian.standing", "description": ""}]
    visibility = [{"token": "4", "level": "v80-100", "description": ""}]
    scenes, samples, sample_data, poses, instances, anns, questions = [], [], [], [], [], [], []
    expected = {}
    for s, (name, description) in enumerate(SCENES):
        scene_token = f"scene-tok-{s}"
        tokens = [f"sample-{s}-{k}" for k in range(SAMPLES_PER_SCENE)]
        scenes.append({"token": scene_token, "name": name, "description": description,
                       "log_token": "log-0", "nbr_samples": len(tokens),
                       "first_sample_token": tokens[0], "last_sample_token": tokens[-1]})
        for k, token in enumerate(tokens):
            samples.append({"token": token, "scene_token": scene_token,
                            "timestamp": 1_500_000_000_000_000 + 500_000 * k,
                            "prev": tokens[k - 1] if k else "",
                            "next": tokens[k + 1] if k + 1 < len(tokens) else ""})
            pose = {"token": f"pose-{token}", "translation": [100.0 + k, 50.0, 0.0],
                    "rotation": _yaw_quaternion(np.pi / 2), "timestamp": 0}
            poses.append(pose)
            for c in channels:
                if c == LIDAR:
                    filename = f"samples/{c}/{token}.pcd.bin"
                    points = rng.normal(size=(40, 5)).astype(np.float32)
                    points[:, 3] = rng.uniform(0, 255, size=40)
                    (root / filename).parent.mkdir(parents=True, exist_ok=True)
                    points.tofile(root / filename)
                    expected[token] = points
                else:
                    filename = f"samples/{c}/{token}.jpg"
                    (root / filename).parent.mkdir(parents=True, exist_ok=True)
                    pixels = rng.integers(0, 255, size=(*IMAGE_HW, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / filename, format="PNG")
                sample_data.append({"token": f"sd-{token}-{c}", "sample_token": token,
                                    "ego_pose_token": pose["token"],
                                    "calibrated_sensor_token": f"cs-{c}", "filename": filename,
                                    "fileformat": "bin" if c == LIDAR else "jpg",
                                    "is_key_frame": True, "timestamp": 0, "prev": "",
                                    "next": "", "height": IMAGE_HW[0], "width": IMAGE_HW[1]})
            # A parked car 10 m north of the ego (the ego faces north: yaw pi/2) and an animal.
            instances.append({"token": f"inst-car-{token}", "category_token": "cat-car",
                              "nbr_annotations": 1})
            instances.append({"token": f"inst-dog-{token}", "category_token": "cat-animal",
                              "nbr_annotations": 1})
            for inst, attr, dy in ((f"inst-car-{token}", ["att-parked"], 10.0),
                                   (f"inst-dog-{token}", [], 3.0)):
                anns.append({"token": f"ann-{inst}", "sample_token": token,
                             "instance_token": inst, "attribute_tokens": attr,
                             "visibility_token": "4",
                             "translation": [100.0 + k, 50.0 + dy, 0.8],
                             "size": [1.9, 4.5, 1.6], "rotation": _yaw_quaternion(np.pi / 2),
                             "num_lidar_pts": 10, "num_radar_pts": 0, "prev": "", "next": ""})
            questions.append({"sample_token": token, "question": "Are there any cars?",
                              "answer": "yes", "template_type": "exist", "num_hop": 0})
            questions.append({"sample_token": token, "question": "How many cars are there?",
                              "answer": "1", "template_type": "count", "num_hop": 0})
    questions.append({"sample_token": "sample-of-another-version", "question": "?",
                      "answer": "no", "template_type": "exist", "num_hop": 0})
    for name, rows in (("scene", scenes), ("sample", samples), ("sample_data", sample_data),
                       ("ego_pose", poses), ("sensor", sensors),
                       ("calibrated_sensor", calibrated), ("log", logs), ("map", maps),
                       ("category", categories), ("attribute", attributes),
                       ("visibility", visibility), ("instance", instances),
                       ("sample_annotation", anns)):
        _write(root, name, rows)
    half = len(questions) // 2
    (root / "NuScenes_train_questions.json").write_text(json.dumps(
        {"info": {}, "questions": questions[:half]}))
    (root / "NuScenes_val_questions.json").write_text(json.dumps(
        {"info": {}, "questions": questions[half:]}))
    return expected


@pytest.fixture
def nuscenes_root(tmp_path):
    expected = make_tiny_nuscenes(tmp_path)
    return tmp_path, expected


def test_splits_hold_mini_scenes_by_scene_with_day_and_night(nuscenes_root):
    root, _ = nuscenes_root
    train = load_nuscenes_qa(root, "train")
    test = QADataset.load(root, "test")  # dispatches here: no manifest in root
    assert len(QADataset.load(root, "val")) == 0
    assert not train.scene_ids() & test.scene_ids()
    assert train.scene_ids() | test.scene_ids() == {n for n, _ in SCENES[:4]}
    for data in (train, test):
        assert len(data.filter(night=True).scene_ids()) == 1
        assert len(data.filter(night=False).scene_ids()) == 1
        assert len(data) == 2 * 2 * SAMPLES_PER_SCENE
    everything = load_nuscenes_qa(root, "train", mini_only=False, fractions=(1.0, 0.0, 0.0))
    assert "scene-0001" in everything.scene_ids()


def test_frame_holds_six_views_lidar_light_and_objects(nuscenes_root):
    root, expected = nuscenes_root
    data = load_nuscenes_qa(root, "train", fractions=(1.0, 0.0, 0.0))
    token = "sample-2-1"  # a night scene
    frame = data.frame(token)
    frame.validate()
    assert frame.scene_id == "scene-1077" and frame.light == 0.0 and frame.is_night
    assert set(frame.cameras) == set(CAMERA_VIEWS)
    assert frame.cameras["CAM_BACK"].shape == (*IMAGE_HW, 3)
    want = expected[token][:, :4].copy()
    want[:, 3] /= 255.0
    np.testing.assert_allclose(frame.lidar, want, rtol=1e-6)
    assert [o.category for o in frame.objects] == ["car"]  # the animal is not a QA class
    car = frame.objects[0]
    assert car.status == "parked"
    np.testing.assert_allclose(car.center, (10.0, 0.0, 0.8), atol=1e-9)  # straight ahead
    assert car.yaw == pytest.approx(0.0)
    assert data.frame("sample-0-0").light == 1.0
    resized = load_nuscenes_qa(root, "train", fractions=(1.0, 0.0, 0.0), image_size=(4, 6))
    assert resized.frame(token).cameras["CAM_FRONT"].shape == (4, 6, 3)


def test_direct_table_reader_matches_devkit_semantics(nuscenes_root):
    root, _ = nuscenes_root
    tables = NuScenesTables(root, VERSION)
    data = tables.sample_data("sample-1-0")
    assert set(data) == {*CAMERA_VIEWS, LIDAR}
    assert tables.sample_data_path(data[LIDAR]) == root / "samples/LIDAR_TOP/sample-1-0.pcd.bin"
    with pytest.raises(KeyError, match="sample.json.*no-such"):
        tables.get("sample", "no-such")


def test_missing_table_file_or_questions_are_clear_errors(nuscenes_root):
    root, _ = nuscenes_root
    (root / VERSION / "sample_data.json").unlink()
    with pytest.raises(FileNotFoundError, match="sample_data.json"):
        load_nuscenes_qa(root, "train")
    with pytest.raises(FileNotFoundError, match="v1.0-trainval"):
        load_nuscenes_qa(root, "train", version="v1.0-trainval")


def test_missing_sensor_files_are_clear_errors(nuscenes_root):
    root, _ = nuscenes_root
    data = load_nuscenes_qa(root, "train", fractions=(1.0, 0.0, 0.0))
    (root / "samples/CAM_FRONT/sample-0-0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="sample-0-0.jpg"):
        data.frame("sample-0-0")
    (root / "samples/LIDAR_TOP/sample-0-1.pcd.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(DatasetFormatError, match="sample-0-1.pcd.bin"):
        data.frame("sample-0-1")


def test_bad_question_files_are_clear_errors(nuscenes_root, tmp_path):
    root, _ = nuscenes_root
    (root / "NuScenes_val_questions.json").write_text('{"no_questions": []}')
    with pytest.raises(DatasetFormatError, match="NuScenes_val_questions.json"):
        load_nuscenes_qa(root, "train")
    (root / "NuScenes_val_questions.json").unlink()
    (root / "NuScenes_train_questions.json").write_text(json.dumps(
        {"questions": [{"sample_token": "elsewhere", "question": "?", "answer": "no",
                        "template_type": "exist", "num_hop": 0}]}))
    with pytest.raises(DatasetFormatError, match="wrong --version"):
        load_nuscenes_qa(root, "train")
    (root / "NuScenes_train_questions.json").unlink()
    with pytest.raises(FileNotFoundError, match="NuScenes_train_questions.json"):
        load_nuscenes_qa(root, "train")


def test_scene_split_is_deterministic_and_validated():
    scenes = [{"name": f"scene-{i}", "description": "Night" if i % 3 == 0 else "day"}
              for i in range(12)]
    first = split_scenes(scenes, (0.5, 0.25, 0.25), seed=1)
    assert first == split_scenes(scenes, (0.5, 0.25, 0.25), seed=1)
    assert set(first.values()) == {"train", "val", "test"}
    with pytest.raises(ValueError, match="fractions"):
        split_scenes(scenes, (0.5, 0.5, 0.5), seed=1)
