"""Generated worlds on disk: splits by scene, round trip, corruption errors, baselines, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpnp.answers import ANSWER_VOCAB, QUESTION_TYPES
from scenes.baselines import QuestionOnlyModel, majority_baseline, question_only_baseline
from scenes.dataset import QADataset
from scenes.sample import CAMERA_VIEWS, QAItem
from scenes.storage import DatasetFormatError, sha256_of
from scenes.synthetic import SyntheticWorld, WorldConfig, generate_world

TINY = WorldConfig(seed=7, day_frames=16, night_frames=8, frames_per_scene=2,
                   questions_per_frame=5, image_height=16, image_width=24, lidar_width=64)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    return generate_world(TINY, tmp_path_factory.mktemp("world"), progress=False)


@pytest.fixture
def copy_of_world(world_dir, tmp_path):
    import shutil

    return shutil.copytree(world_dir, tmp_path / "world")


def test_splits_are_by_scene_and_hold_day_and_night(world_dir):
    splits = {s: QADataset.load(world_dir, s) for s in ("train", "val", "test")}
    scenes = {s: d.scene_ids() for s, d in splits.items()}
    assert not scenes["train"] & scenes["val"]
    assert not scenes["train"] & scenes["test"]
    assert not scenes["val"] & scenes["test"]
    assert sum(len(d.frame_ids) for d in splits.values()) == 24
    for data in splits.values():
        assert data.filter(night=True).frame_ids and data.filter(night=False).frame_ids
        night = data.filter(night=True)
        assert all(data.frame_info(f).light < 0.35 for f in night.frame_ids)
        assert len(night) + len(data.filter(night=False)) == len(data)


def test_questions_on_disk_use_the_vocabulary_and_every_type(world_dir):
    items = [q for s in ("train", "val", "test") for q in QADataset.load(world_dir, s).items]
    assert len(items) == 24 * 5
    assert {q.answer for q in items} <= set(ANSWER_VOCAB)
    assert {q.template_type for q in items} == set(QUESTION_TYPES)
    assert {q.num_hop for q in items} == {0, 1}
    raw = json.loads((world_dir / "train" / "questions.json").read_text())
    assert {"sample_token", "question", "answer", "template_type", "num_hop"} <= set(
        raw["questions"][0])


def test_frames_round_trip_exactly(world_dir):
    data = QADataset.load(world_dir, "test")
    frame_id = data.frame_ids[0]
    loaded = data.frame(frame_id)
    scene_id, index = frame_id.rsplit("-", 1)
    made, _ = SyntheticWorld(TINY).make_frame(scene_id, int(index), loaded.light)
    for view in CAMERA_VIEWS:
        np.testing.assert_array_equal(loaded.cameras[view], made.cameras[view])
    np.testing.assert_array_equal(loaded.lidar, made.lidar)
    assert loaded.objects == made.objects
    assert data.frame(frame_id) is loaded  # cached


def test_generation_is_deterministic(world_dir, tmp_path):
    again = generate_world(TINY, tmp_path / "again", progress=False)
    first = json.loads((world_dir / "manifest.json").read_text())["files"]
    second = json.loads((again / "manifest.json").read_text())["files"]
    assert first == second


def test_manifest_lists_sha256_of_every_file(world_dir):
    manifest = json.loads((world_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["config"]["seed"] == 7
    assert len(manifest["files"]) == 24 + 3
    for rel, digest in manifest["files"].items():
        assert sha256_of(world_dir / rel) == digest


def test_corrupt_frame_is_a_clear_error(copy_of_world):
    data = QADataset.load(copy_of_world, "train")
    frame_id = data.frame_ids[0]
    path = copy_of_world / "train" / "frames" / f"{frame_id}.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetFormatError, match=str(path)):
        data.frame(frame_id)


def test_missing_frame_is_a_clear_error(copy_of_world):
    data = QADataset.load(copy_of_world, "val")
    frame_id = data.frame_ids[0]
    path = copy_of_world / "val" / "frames" / f"{frame_id}.npz"
    path.unlink()
    with pytest.raises(FileNotFoundError, match=str(path)):
        data.frame(frame_id)


def test_corrupt_or_missing_index_files_are_clear_errors(copy_of_world):
    questions = copy_of_world / "test" / "questions.json"
    questions.write_text(questions.read_text().replace('"yes"', '"maybe"', 1))
    with pytest.raises(DatasetFormatError, match="sha256"):
        QADataset.load(copy_of_world, "test")
    (copy_of_world / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="manifest.json"):
        QADataset.load(copy_of_world, "train")
    with pytest.raises(ValueError, match="split"):
        QADataset.load(copy_of_world, "dev")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        QADataset.load(copy_of_world / "nowhere", "train")


def _items(pairs):
    return [QAItem(f"f{i}", q, a, t, 0) for i, (q, a, t) in enumerate(pairs)]


def test_majority_baseline_uses_the_most_frequent_answer_per_type():
    train = _items([("Are there any cars?", "yes", "exist")] * 3
                   + [("Are there any buses?", "no", "exist")]
                   + [("How many cars are there?", "2", "count")] * 2)
    test = _items([("Are there any trucks?", "yes", "exist"), ("Are there any cars?", "no",
                                                               "exist"),
                   ("How many buses are there?", "2", "count")])
    acc = majority_baseline(train, test)
    assert acc.per_type == {"exist": 0.5, "count": 1.0}
    assert acc.overall == pytest.approx(2 / 3)


def test_question_only_model_learns_text_but_not_random_answers():
    rng = np.random.default_rng(0)
    classes = ["cars", "buses", "trucks", "barriers"]
    learnable = _items([(f"Are there any {c}?", "yes" if c in ("cars", "trucks") else "no",
                         "exist") for c in classes * 20])
    assert question_only_baseline(learnable, learnable).overall == 1.0
    random_train = _items([(f"Are there any {c}?", str(rng.choice(["yes", "no"])), "exist")
                           for c in classes * 50])
    random_test = _items([(f"Are there any {c}?", str(rng.choice(["yes", "no"])), "exist")
                          for c in classes * 50])
    assert question_only_baseline(random_train, random_test).overall < 0.62
    model = QuestionOnlyModel().fit(learnable)
    assert model.predict(_items([("Are there any trucks?", "", "exist")])) == ["yes"]


def test_cli_generate_stats_and_show(tmp_path, capsys):
    from mpnp.cli import main

    out = tmp_path / "w"
    assert main(["scenes", "generate", "--out", str(out), "--day-frames", "6",
                 "--night-frames", "3", "--frames-per-scene", "1", "--image-size", "16", "24",
                 "--lidar-width", "64", "--questions-per-frame", "3", "--no-progress"]) == 0
    assert main(["scenes", "stats", "--data", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "question-only" in printed and "majority" in printed
    png = tmp_path / "frame.png"
    assert main(["scenes", "show", "--data", str(out), "--split", "train", "--frame", "0",
                 "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["scenes", "show", "--data", str(out), "--frame", "no-such-frame",
                 "--out", str(png)]) == 1


def test_generation_is_bit_identical_for_any_worker_count(world_dir, tmp_path):
    again = generate_world(TINY, tmp_path / "two", progress=False, workers=2)
    assert (again / "manifest.json").read_bytes() == (world_dir / "manifest.json").read_bytes()
    for split in ("train", "val", "test"):
        assert (again / split / "questions.json").read_bytes() == \
            (world_dir / split / "questions.json").read_bytes()


def test_default_world_plan_has_the_promised_drives():
    from collections import Counter

    plan = SyntheticWorld(WorldConfig()).plan()
    drives = Counter((s.scene_id.split("-")[0], s.split) for s in plan)
    assert drives[("day", "train")] >= 2000 and drives[("night", "train")] >= 600
    for kind in ("day", "night"):
        assert drives[(kind, "val")] >= 20 and drives[(kind, "test")] >= 20
    assert WorldConfig().questions_per_frame >= 20
    assert all(s.frames == WorldConfig().frames_per_scene for s in plan)


def test_annotated_objects_are_observable(world_dir):
    """Every object a question can be about has enough LiDAR returns and is in range."""
    world = SyntheticWorld(TINY)
    for spec in world.plan()[:3]:
        frame, _ = world._frame_and_pool(spec.scene_id, 0, spec.light)
        scene = world._layout(spec.scene_id)
        from scenes.lidar import cast_lidar
        sweep = cast_lidar(scene, 0.0, np.random.default_rng(0), TINY.lidar_beams,
                           TINY.lidar_width)
        visible = sum(h >= TINY.min_lidar_points for h in sweep.hits_per_object)
        assert len(frame.objects) <= visible
        assert all(np.hypot(*o.center[:2]) <= TINY.max_object_distance for o in frame.objects)


def test_stats_report_counts_texts_and_baselines(world_dir, capsys):
    from scenes.stats import format_statistics, world_statistics

    stats = world_statistics(world_dir)
    total = sum(r["questions"] for row in stats["splits"].values() for r in row.values())
    assert total == 24 * 5
    test_day = stats["splits"]["test"]["day"]
    assert sum(test_day["per_type_hop"].values()) == test_day["questions"]
    assert 0.0 <= test_day["texts_seen_in_train"] <= 1.0
    assert set(stats["baselines"]) >= {"test/day", "test/night"}
    text = format_statistics(stats)
    assert "question-only" in text
    assert sum(line.startswith(("train ", "val ", "test ")) for line in text.splitlines()) == 6


def test_world_variants_differ_from_the_default():
    from scenes.synthetic import world_variant

    shifted = world_variant("shifted")
    assert shifted.seed != WorldConfig().seed and shifted.density != WorldConfig().density
    assert world_variant("default") == WorldConfig()
    with pytest.raises(ValueError, match="unknown world variant"):
        world_variant("nope")


def test_generation_does_not_depend_on_the_process_hash_seed(tmp_path):
    """String hashing differs between processes (PYTHONHASHSEED); the world must not."""
    import os
    import subprocess
    import sys

    script = ("import sys; from scenes.synthetic import WorldConfig, generate_world; "
              "generate_world(WorldConfig(seed=7, day_frames=8, night_frames=4, "
              "frames_per_scene=2, questions_per_frame=8, image_height=16, image_width=24, "
              "lidar_width=64), sys.argv[1], progress=False, workers=1)")
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = tmp_path / f"hash{seed}"
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env)
        outputs.append((out / "manifest.json").read_bytes())
    assert outputs[0] == outputs[1]
