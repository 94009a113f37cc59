"""Live samples through the daemon (toy backend): the ``teach``, ``objects`` and
``pseudo_label`` commands (good and bad input), the on-disk buffer they fill, and an
adaptation that trains on it with ``[adaptation] data = "live"``."""

from __future__ import annotations

import time

import pytest
from test_daemon_support import ToyBackend, running_daemon, test_config, toy_frame, wait_for

from daemon.client import Client, DaemonError, SensorPublisher
from daemon.samples import LiveSamples

OBJECTS = [
    {"class": "car", "status": "parked", "x": 8.0, "y": 3.0, "z": 0.0, "length": 4.5,
     "width": 1.9, "height": 1.5, "yaw": 0.1},
    {"class": "car", "status": "moving", "x": -12.0, "y": -2.0, "z": 0.0, "length": 4.4,
     "width": 1.8, "height": 1.6, "yaw": 3.1},
    {"class": "pedestrian", "status": "standing", "x": 5.0, "y": -6.0, "z": 0.0,
     "length": 0.5, "width": 0.6, "height": 1.7, "yaw": 0.0, "id": "ped-1"},
    {"class": "traffic cone", "status": None, "x": 15.0, "y": 1.0, "z": 0.0, "length": 0.5,
     "width": 0.5, "height": 0.8, "yaw": 0.0},
]


def _feed(publisher, frame_id, t, light=1.0):
    frame = toy_frame(frame_id, timestamp=t, light=light)
    publisher.send_camera(frame)
    publisher.send_lidar(frame)


@pytest.fixture
def daemon_parts(tmp_path):
    config = test_config(tmp_path, adaptation={"auto": False, "data": "live",
                                               "min_samples": 8, "val_fraction": 0.25},
                         samples={"questions_per_frame": 6})
    backend = ToyBackend()
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client, \
            SensorPublisher(daemon.endpoints["ingest"], hwm=50) as publisher:
        for i in range(4):
            _feed(publisher, f"f{i}", float(i))
        wait_for(lambda: daemon.metrics.frames_in.total() >= 8)
        yield daemon, client, backend, tmp_path


def test_objects_become_template_questions_in_the_context_buffer(daemon_parts):
    daemon, client, _, tmp_path = daemon_parts
    reply = client.objects("f1", OBJECTS, context="night")
    assert reply["stored"] == 6 and reply["objects"] == 4 and reply["context"] == "night"
    assert reply["frame_id"] == "f1" and reply["buffered"] == 6
    for sample in reply["samples"]:
        assert sample["source"] == "objects" and sample["confidence"] == 1.0
        assert sample["question"].endswith("?")
    # answers follow the object list: nothing seen means no, none, 0
    empty = client.objects("f2", [], questions_per_frame=4, context="night")
    assert all(s["answer"] in ("no", "0") for s in empty["samples"]), empty["samples"]
    on_disk = LiveSamples(tmp_path / "samples", 10**9, 10**6)
    [(frame, samples)] = list(on_disk.buffer("night").items())[:1]
    assert frame.frame_id == "f1" and set(frame.sensors) == {"camera", "lidar"}
    assert len(samples) == 6
    status = client.status()["samples"]
    assert status["mode"] == "live" and status["contexts"]["night"]["samples"] == 10


def test_teach_and_pseudo_label(daemon_parts):
    _, client, _, _ = daemon_parts
    reply = client.teach("f0", "Is the road wet?", "Yes", context="night")
    assert reply["stored"] == 1 and reply["samples"][0] == {
        "question": "Is the road wet?", "answer": "yes", "source": "taught", "confidence": 1.0}
    pseudo = client.pseudo_label("f3", questions_per_frame=5, context="night")
    assert pseudo["stored"] == 5 and pseudo["confidence_measured"] is True
    assert pseudo["teacher"]["modalities"] == ["camera"]
    for sample in pseudo["samples"]:
        assert sample["source"] == "pseudo" and sample["confidence"] == pytest.approx(0.9)
        # the toy's answer spells out the question, the teacher and the frame
        assert sample["answer"] == f"{sample['question']}|camera|v0|f3".lower()
    dropped = client.pseudo_label("f3", questions_per_frame=3, min_confidence=0.95)
    assert dropped["stored"] == 0 and dropped["dropped"] == 3 and dropped["segment"] is None
    # without a context the policy's (day by daylight) decides
    assert client.teach("f0", "Is it raining?", "no")["context"] == "day"


@pytest.mark.parametrize("kind,body,needle", [
    ("objects", {"frame_id": "f0", "objects": [{**OBJECTS[0], "class": "tank"}]},
     "objects[0].class"),
    ("objects", {"frame_id": "f0", "objects": [{**OBJECTS[0], "status": "flying"}]},
     "objects[0].status"),
    ("objects", {"frame_id": "f0", "objects": [{**OBJECTS[0], "status": None}]},
     "objects[0].status"),
    ("objects", {"frame_id": "f0", "objects": [{k: v for k, v in OBJECTS[0].items()
                                                if k != "yaw"}]}, "objects[0].yaw"),
    ("objects", {"frame_id": "f0", "objects": [{**OBJECTS[0], "x": "near"}]}, "objects[0].x"),
    ("objects", {"frame_id": "f0", "objects": [{**OBJECTS[0], "width": -1}]},
     "objects[0].width"),
    ("objects", {"frame_id": "f0", "objects": [{**OBJECTS[0], "colour": "red"}]},
     "unknown keys"),
    ("objects", {"frame_id": "f0", "objects": {"class": "car"}}, "'objects'"),
    ("objects", {"frame_id": "f0", "objects": [], "questions_per_frame": 0},
     "questions_per_frame"),
    ("objects", {"frame_id": "f0", "objects": [], "context": "../up"}, "'context'"),
    ("objects", {"objects": []}, "'frame_id'"),
    ("teach", {"frame_id": "f0", "question": "", "answer": "yes"}, "'question'"),
    ("teach", {"frame_id": "f0", "question": "q?", "answer": 3}, "'answer'"),
    ("teach", {"frame_id": "f0", "question": "q?", "answer": "a", "extra": 1}, "unknown"),
    ("pseudo_label", {"frame_id": "f0", "min_confidence": 2}, "min_confidence"),
])
def test_bad_sample_requests_name_their_field(daemon_parts, kind, body, needle):
    _, client, _, _ = daemon_parts
    from daemon.protocol import MessageType

    with pytest.raises(DaemonError) as info:
        client.request(MessageType(kind), **body)
    assert info.value.code == "bad_request" and needle in str(info.value), str(info.value)


def test_limits_and_missing_frames(daemon_parts):
    daemon, client, _, _ = daemon_parts
    limit = daemon.config.samples.max_objects
    with pytest.raises(DaemonError) as info:
        client.objects("f0", [OBJECTS[0]] * (limit + 1))
    assert info.value.code == "too_large"
    with pytest.raises(DaemonError) as info:
        client.teach("gone", "q?", "yes")
    assert info.value.code == "frame_not_found"


def test_adaptation_trains_on_live_samples_once_there_are_enough(daemon_parts):
    daemon, client, backend, _ = daemon_parts
    client.objects("f0", OBJECTS, context="night")
    client.adapt("start", ["lidar"])
    wait_for(lambda: client.status()["last_adaptation"] is not None, timeout=10)
    assert backend.data["source"] == "world"  # 6 < min_samples = 8: the world's data
    for frame_id in ("f1", "f2", "f3"):
        client.objects(frame_id, OBJECTS, context="night")
    client.teach("f3", "Is the road wet?", "yes", context="night")
    before = len(client.status()["budget"]["decisions"])
    client.adapt("start", ["lidar"])
    wait_for(lambda: len(client.status()["budget"]["decisions"]) > before
             and client.status()["adaptation"] is None, timeout=10)
    data = backend.data
    assert data["source"] == "live" and data["context"] == "night"
    # 4 frames, the newest (f3: 6 object questions + 1 taught) held out
    assert data["frames"] == 4 and data["val"] == 7 and data["train"] == 18
    assert data["sample_sources"] == ["objects", "taught"]


def test_world_stays_the_default(tmp_path):
    config = test_config(tmp_path, adaptation={"auto": False, "min_samples": 2})
    backend = ToyBackend()
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client, \
            SensorPublisher(daemon.endpoints["ingest"], hwm=50) as publisher:
        for i in range(3):
            _feed(publisher, f"f{i}", float(i))
        wait_for(lambda: daemon.metrics.frames_in.total() >= 6)
        for i in range(3):
            client.objects(f"f{i}", OBJECTS, context="night")
        client.adapt("start", ["lidar"])
        wait_for(lambda: client.status()["last_adaptation"] is not None, timeout=10)
        assert backend.data["source"] == "world"
        assert client.status()["samples"]["contexts"]["night"]["samples"] > 2


def test_object_lists_round_trip_through_the_wire_schema():
    from daemon.teaching import objects_to_wire, parse_objects
    from scenes.sample import ObjectAnnotation

    frame = toy_frame("g")
    frame.objects = [ObjectAnnotation("bus", (10.0, -3.0, 0.2), (2.7, 11.0, 3.3), 0.4, "stopped"),
                     ObjectAnnotation("barrier", (4.0, 5.0, 0.0), (0.5, 0.5, 0.9), 0.0, None)]
    assert parse_objects(objects_to_wire(frame.objects), 10) == frame.objects


def test_the_serving_state_pseudo_labels_new_frames_when_configured(tmp_path):
    config = test_config(tmp_path, adaptation={"auto": False},
                         samples={"pseudo_label_every_s": 0.01, "questions_per_frame": 3,
                                  "pseudo_label_context": "night"})
    with running_daemon(config, ToyBackend()) as daemon, \
            Client(daemon.endpoints["query"]) as client, \
            SensorPublisher(daemon.endpoints["ingest"], hwm=50) as publisher:
        _feed(publisher, "p0", 0.0)
        wait_for(lambda: client.status()["samples"]["contexts"].get("night", {}).get(
            "samples") == 3)
        _feed(publisher, "p1", 1.0)
        wait_for(lambda: client.status()["samples"]["contexts"]["night"]["samples"] == 6)
        time.sleep(0.1)  # the same newest frame is not labelled twice
        assert client.status()["samples"]["contexts"]["night"]["samples"] == 6
        items = list(daemon.engine.samples.buffer("night").items())
        assert [f.frame_id for f, _ in items] == ["p0", "p1"]
        assert {s.source for _, samples in items for s in samples} == {"pseudo"}


def test_pseudo_label_settings_are_checked():
    from daemon.config import SamplesConfig

    for bad in ({"pseudo_label_every_s": -1}, {"pseudo_label_context": "Night!"},
                {"pseudo_label_min_confidence": 2.0}, {"questions_per_frame": 0},
                {"max_mb": 0}):
        with pytest.raises(ValueError):
            SamplesConfig(**bad)


class _DriveWithObjects:
    def frame(self, index, light):
        from scenes.sample import ObjectAnnotation

        frame = toy_frame(f"w{index}", light=light)
        frame.objects = [ObjectAnnotation("car", (5.0 + index, 1.0, 0.0), (1.9, 4.5, 1.5), 0.0,
                                          "moving")]
        return frame


def test_the_simulated_vehicle_sends_its_object_lists(tmp_path):
    from daemon.sim_vehicle import SimVehicle, SimVehicleConfig

    config = test_config(tmp_path, adaptation={"auto": False},
                         samples={"questions_per_frame": 2})
    with running_daemon(config, ToyBackend()) as daemon:
        vehicle = SimVehicleConfig(endpoint=daemon.endpoints["ingest"], camera_hz=40.0,
                                   lidar_hz=40.0, world_interval_s=0.1, duration_s=0.75,
                                   objects_every=2, hwm=50,
                                   query_endpoint=daemon.endpoints["query"],
                                   objects_context="night")
        stats = SimVehicle(vehicle, _DriveWithObjects()).run()
        assert stats.objects_sent >= 2 and stats.objects_failed == 0
        assert stats.samples_stored == 2 * stats.objects_sent
        buffer = daemon.engine.samples.buffer("night")
        assert len(buffer) == stats.samples_stored
        ids = [s.frame_id for s in buffer.segments()]
        assert ids[:2] == ["w0", "w2"]
    with pytest.raises(ValueError):
        SimVehicleConfig(objects_every=-1)
