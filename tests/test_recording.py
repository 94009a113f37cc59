"""Recording, replay and report (issue 14, parts 2-5), on the toy backend and real sockets.

A simulated drive is recorded by the daemon's [recording] option and replayed into a fresh
daemon (same answers); ROS 2 bags written here (rosbag2 sqlite3 and MCAP storage, and the
bare MCAP file inside the latter) with Image, CompressedImage and PointCloud2 replay through
a topic map; rotation by size; every kind of unreadable input is one line; replay never sends
what the protocol refuses; the report draws a PNG and writes Markdown.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from test_daemon_support import alarm, running_daemon, test_config, toy_frame, wait_for

from daemon.client import Client, SensorPublisher
from daemon.config import LimitsConfig
from daemon.protocol import SensorKind, decode_sensor_message, encode_sensor_message
from recording.reader import Item, RecordingError, RecordingReader
from recording.replay import parse_rate, replay
from recording.ros2 import TopicMap
from recording.writer import Recorder, RecordingSettings, RotatingMcapWriter, recording_files
from scenes.sample import CAMERA_VIEWS, LIDAR

QUESTIONS = ("How many cars are there?", "Is there a pedestrian?", "What is parked?")


def _wire(parts) -> list[bytes]:
    return [bytes(p) for p in parts]


def _frames_in(client: Client) -> dict[str, float]:
    return client.status()["counters"]["frames_in"]


def _drive(daemon, frames: int = 10) -> tuple[list[list[bytes]], list[dict]]:
    """A short simulated drive: day -> night, camera (with ambient light) + LiDAR per frame,
    questions with and without a frame id, one power-mode change. Returns what was sent."""
    sent: list[list[bytes]] = []
    answers: list[dict] = []
    with SensorPublisher(daemon.endpoints["ingest"]) as pub, \
            Client(daemon.endpoints["query"], timeout_s=10) as client:
        for i in range(frames):
            light = 1.0 if i < frames // 2 else 0.05
            frame = toy_frame(f"drive-{i:03d}", 1000.0 + 0.1 * i, light, size=(16, 24))
            for parts in (
                encode_sensor_message(SensorKind.CAMERA, frame.frame_id, frame.timestamp,
                                      dict(frame.cameras), light),
                encode_sensor_message(SensorKind.LIDAR, frame.frame_id, frame.timestamp,
                                      {LIDAR: frame.lidar}),
            ):
                sent.append(_wire(parts))
                assert pub.send_parts(parts, timeout_s=5)
            wait_for(lambda n=len(sent): sum(_frames_in(client).values()) >= n)
            question = QUESTIONS[i % len(QUESTIONS)]
            answers.append(client.ask(question, frame.frame_id if i % 2 else None))
            if i == frames // 2:
                client.set_power_mode("MODE_15W")
    return sent, answers


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The drive, recorded by the daemon's [recording] option."""
    tmp = tmp_path_factory.mktemp("drive")
    config = test_config(tmp, adaptation={"auto": False},
                         recording={"path": str(tmp / "rec"), "status_interval_s": 0.05})
    with alarm(60), running_daemon(config) as daemon:
        sent, answers = _drive(daemon)
        time.sleep(0.2)  # a few more status samples after the last answer
    return tmp / "rec", sent, answers


def test_the_daemon_records_frames_losslessly_with_questions_events_and_status(recorded):
    directory, sent, answers = recorded
    files = recording_files(directory)
    assert [f.name for f in files] == ["recording-0001.mcap"]
    notices: list[str] = []
    items = list(RecordingReader(directory, notice=notices.append))
    assert notices == []
    # exactly the bytes the daemon accepted, in order
    assert [item.parts for item in items if item.kind == "sensor"] == sent
    queries = [i.body for i in items if i.kind == "request" and i.body["type"] == "query"]
    assert [q["reply"]["answer"] for q in queries] == [a["answer"] for a in answers]
    assert all(q["status"] == "ok" and q["latency_s"] > 0 for q in queries)
    power = [i.body for i in items if i.kind == "request" and i.body["type"] == "set_power_mode"]
    assert power and power[0]["request"]["mode"] == "MODE_15W"
    topics = {i.topic for i in items}
    assert {"/mpnp/event/power.mode", "/mpnp/event/context.changed",
            "/mpnp/event/daemon.lifecycle", "/mpnp/status", "/mpnp/recorder"} <= topics
    recorder = next(i.body for i in items if i.kind == "recorder")
    assert recorder["dropped"] == {} and recorder["errors"] == 0


def test_the_recording_is_foxglove_viewable(recorded):
    from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud
    from foxglove_schemas_protobuf.RawImage_pb2 import RawImage
    from mcap.reader import make_reader

    directory, sent, _ = recorded
    with open(recording_files(directory)[0], "rb") as fh:
        reader = make_reader(fh)
        assert reader.get_header().profile == "mpnp"
        summary = reader.get_summary()
        by_topic = {c.topic: summary.schemas[c.schema_id] for c in summary.channels.values()
                    if c.schema_id}
        assert by_topic["/mpnp/camera/CAM_FRONT"].name == "foxglove.RawImage"
        assert by_topic["/mpnp/lidar/LIDAR_TOP"].name == "foxglove.PointCloud"
        assert by_topic["/mpnp/status"].encoding == "jsonschema"
        image = point = None
        for _, channel, message in reader.iter_messages(
                topics=["/mpnp/camera/CAM_BACK", "/mpnp/lidar/LIDAR_TOP"]):
            if channel.topic == "/mpnp/camera/CAM_BACK":
                image = RawImage.FromString(message.data)
            else:
                point = PointCloud.FromString(message.data)
    assert (image.width, image.height, image.encoding, image.step) == (24, 16, "rgb8", 72)
    assert [f.name for f in point.fields] == ["x", "y", "z", "intensity"]
    assert point.point_stride == 16 and point.data == sent[-1][1]


def test_replay_into_a_fresh_daemon_gives_the_same_answers(recorded, tmp_path):
    directory, sent, answers = recorded
    config = test_config(tmp_path, adaptation={"auto": False})
    with alarm(60), running_daemon(config) as daemon, \
            SensorPublisher(daemon.endpoints["ingest"]) as pub, \
            Client(daemon.endpoints["query"], timeout_s=10) as client:
        result = replay(RecordingReader(directory), lambda p: pub.send_parts(p, 5),
                        client.ask, rate=None)
        assert result.refused == {} and result.sensor_dropped == 0
        assert result.sensor_sent == len(sent)
        assert result.questions == len(answers)
        assert result.different == [] and result.same_answers == len(answers)
        counters = client.status()["counters"]
        assert counters["frames_in"] == {"camera": len(sent) / 2, "lidar": len(sent) / 2}
        assert counters["frames_dropped"] == {}


def test_replay_paces_at_the_requested_rate():
    header = encode_sensor_message(SensorKind.LIDAR, "f", 1.0,
                                   {LIDAR: np.zeros((4, 4), np.float32)})
    items = [Item("sensor", int(t * 1e9), "/mpnp/ingest", parts=_wire(header))
             for t in (0.0, 0.3, 0.6)]
    sent: list[float] = []
    start = time.monotonic()
    replay(items, lambda parts: sent.append(time.monotonic() - start) or True, rate=2.0)
    assert 0.28 <= sent[-1] < 0.6  # 0.6 s of recording at 2x (a loaded CPU sleeps longer)
    assert sent[0] < 0.1
    assert parse_rate("max") is None and parse_rate("4x") == 4.0
    with pytest.raises(ValueError, match="--rate"):
        parse_rate("fast-ish")


def test_replay_never_sends_what_the_protocol_refuses():
    good = _wire(encode_sensor_message(SensorKind.LIDAR, "ok", 1.0,
                                       {LIDAR: np.ones((3, 4), np.float32)}))
    nan = _wire(encode_sensor_message(SensorKind.LIDAR, "nan", 2.0,
                                      {LIDAR: np.full((3, 4), np.nan, np.float32)}))
    wrong_version = [json.dumps({**json.loads(good[0]), "v": 2}).encode(), good[1]]
    one_view = _wire(encode_sensor_message(SensorKind.CAMERA, "cam", 3.0,
                                           {"CAM_FRONT": np.zeros((4, 4, 3), np.uint8)}))
    items = [Item("sensor", i, "/mpnp/ingest", parts=p)
             for i, p in enumerate([good, nan, wrong_version, one_view, good])]
    sent: list[list[bytes]] = []
    notices: list[str] = []
    result = replay(items, lambda parts: sent.append(parts) or True, rate=None,
                    notice=notices.append)
    assert sent == [good, good]
    assert result.refused == {"non_finite": 1, "unsupported_version": 1, "buffer_mismatch": 1}
    assert len(notices) == 3 and all("\n" not in n and "not sent" in n for n in notices)


def _random_lidar(seed: int, points: int = 2000) -> list[bytes]:
    array = np.random.default_rng(seed).standard_normal((points, 4)).astype(np.float32)
    return _wire(encode_sensor_message(SensorKind.LIDAR, f"r{seed:04d}", float(seed),
                                       {LIDAR: array}))


def test_rotation_by_size_keeps_max_files_each_readable(tmp_path):
    settings = RecordingSettings(path=str(tmp_path), max_bytes=100_000, chunk_bytes=16_384,
                                 max_files=3, flush_interval_s=0.05)
    recorder = Recorder(settings)
    messages = [_random_lidar(i) for i in range(60)]  # ~32 KB each, incompressible
    for parts in messages:
        assert recorder.sensor(parts)
    recorder.close()
    files = recording_files(tmp_path)
    assert len(files) == 3 and files[-1].name != "recording-0001.mcap"
    assert len(recorder.files.files_written) > 3  # older files were deleted
    for path in files:
        assert path.stat().st_size < 100_000 + len(b"".join(messages[0])) + 16_384
    remaining = [item.parts for path in files for item in RecordingReader(path)
                 if item.kind == "sensor"]
    assert remaining == messages[-len(remaining):]  # the newest, complete and in order
    # a new session continues the numbering instead of overwriting
    again = Recorder(settings)
    again.sensor(messages[0])
    again.close()
    assert again.files.files_written[0].name == \
        f"recording-{int(files[-1].stem.split('-')[1]) + 1:04d}.mcap"


def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path):
    # a bound smaller than one sensor message (32 KB): each is dropped at once, whatever the
    # writer thread is doing; small JSON items still fit
    recorder = Recorder(RecordingSettings(path=str(tmp_path), queue_bytes=20_000))
    start = time.monotonic()
    accepted = [recorder.sensor(_random_lidar(i)) for i in range(4)]
    assert time.monotonic() - start < 0.5
    assert recorder.event("power.mode", {"mode": "MODE_15W"})
    recorder.close()
    assert accepted == [False] * 4 and recorder.dropped == {"sensor": 4}
    items = list(RecordingReader(tmp_path))
    assert next(i.body for i in items if i.kind == "recorder")["dropped"] == recorder.dropped


def test_a_truncated_recording_is_read_up_to_the_cut(tmp_path):
    recorder = Recorder(RecordingSettings(path=str(tmp_path / "rec"), chunk_bytes=20_000))
    messages = [_random_lidar(i, 500) for i in range(40)]
    for parts in messages:
        recorder.sensor(parts)
    recorder.close()
    data = recording_files(tmp_path / "rec")[0].read_bytes()
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[:len(data) // 2])
    notices: list[str] = []
    got = [i.parts for i in RecordingReader(cut, notice=notices.append) if i.kind == "sensor"]
    assert 5 < len(got) < len(messages) and got == messages[:len(got)]
    assert len(notices) == 1 and "truncated" in notices[0] and "\n" not in notices[0]


def test_foreign_files_and_unknown_topics_are_named_in_one_line(tmp_path):
    from mcap.writer import Writer

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a recording at all")
    with pytest.raises(RecordingError, match="not an MCAP file or a rosbag2 directory") as err:
        RecordingReader(junk)
    assert "\n" not in str(err.value)
    with pytest.raises(RecordingError, match="no such file"):
        RecordingReader(tmp_path / "missing.mcap")
    with pytest.raises(RecordingError, match="not a recording"):
        RecordingReader(tmp_path)  # a directory without recording files

    foreign = tmp_path / "foreign.mcap"
    with open(foreign, "wb") as fh:
        writer = Writer(fh)
        writer.start(profile="other", library="test")
        schema = writer.register_schema("x", "jsonschema", b"{}")
        channel = writer.register_channel("/odometry", "json", schema)
        writer.add_message(channel, 1, b"{}", 1)
        writer.finish()
    with pytest.raises(RecordingError, match="neither an mpnp recording.*/odometry") as err:
        RecordingReader(foreign)
    assert "\n" not in str(err.value)

    ours = tmp_path / "ours"
    files = RotatingMcapWriter(RecordingSettings(path=str(ours)))
    files.write("/mpnp/status", "json", b'{"uptime_s": 1}', time.time_ns())
    files.write("/something/else", "json", b"{}", time.time_ns())  # not ours
    files.close()
    notices: list[str] = []
    items = list(RecordingReader(ours, notice=notices.append))
    assert [i.kind for i in items] == ["status"]
    assert len(notices) == 1 and "unknown topic /something/else" in notices[0]


# --- ROS 2 -------------------------------------------------------------------------------

def _ros_types():
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    return store, store.types


def _header(types, t: float, frame: str):
    stamp = types["builtin_interfaces/msg/Time"](sec=int(t), nanosec=int((t % 1) * 1e9))
    return types["std_msgs/msg/Header"](stamp=stamp, frame_id=frame)


def _views(index: int, h: int = 16, w: int = 24) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {view: rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for view in CAMERA_VIEWS}


def _points(index: int) -> np.ndarray:
    return np.random.default_rng(100 + index).standard_normal((50, 4)).astype(np.float32)


def _ros_messages(types, index: int, t: float):
    """One instant: six camera views as Image (rgb8, bgr8 with row padding, rgba8, mono8)
    and CompressedImage (PNG), plus a PointCloud2 with x, y, z, intensity and a NaN point."""
    from PIL import Image as PILImage

    Image = types["sensor_msgs/msg/Image"]
    Compressed = types["sensor_msgs/msg/CompressedImage"]
    views = _views(index)
    out = []
    for k, (view, pixels) in enumerate(views.items()):
        h, w, _ = pixels.shape
        topic = f"/{view.lower()}/image"
        if k in (0, 1):
            out.append((topic, Image(header=_header(types, t, view), height=h, width=w,
                                     encoding="rgb8", is_bigendian=0, step=w * 3,
                                     data=pixels.reshape(-1).copy())))
        elif k == 2:
            padded = np.zeros((h, w * 3 + 8), np.uint8)
            padded[:, :w * 3] = pixels[..., ::-1].reshape(h, -1)
            out.append((topic, Image(header=_header(types, t, view), height=h, width=w,
                                     encoding="bgr8", is_bigendian=0, step=w * 3 + 8,
                                     data=padded.reshape(-1))))
        elif k == 3:
            rgba = np.concatenate([pixels, np.full((h, w, 1), 7, np.uint8)], axis=2)
            out.append((topic, Image(header=_header(types, t, view), height=h, width=w,
                                     encoding="rgba8", is_bigendian=0, step=w * 4,
                                     data=rgba.reshape(-1))))
        else:
            buffer = io.BytesIO()
            PILImage.fromarray(pixels).save(buffer, format="PNG")
            out.append((topic, Compressed(header=_header(types, t, view), format="png",
                                          data=np.frombuffer(buffer.getvalue(), np.uint8))))
    Field = types["sensor_msgs/msg/PointField"]
    points = _points(index)
    with_nan = np.concatenate([points, np.array([[np.nan, 0, 0, 1]], np.float32)])
    fields = [Field(name=n, offset=4 * i, datatype=Field.FLOAT32, count=1)
              for i, n in enumerate(("x", "y", "z", "intensity"))]
    cloud = types["sensor_msgs/msg/PointCloud2"](
        header=_header(types, t, "lidar"), height=1, width=len(with_nan), fields=fields,
        is_bigendian=False, point_step=16, row_step=16 * len(with_nan),
        data=with_nan.view(np.uint8).reshape(-1), is_dense=False)
    out.append(("/lidar_top/points", cloud))
    return out


def _write_bag(path: Path, storage: str, instants: int = 3, extra=None) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer

    store, types = _ros_types()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    writer = Writer(path, version=9, storage_plugin=plugin)
    writer.open()
    connections: dict[str, object] = {}
    for index in range(instants):
        t = 1700000000.0 + 0.5 * index
        for topic, message in _ros_messages(types, index, t) + (extra or []):
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, message.__msgtype__,
                                                           typestore=store)
            writer.write(connections[topic], int(t * 1e9),
                         store.serialize_cdr(message, message.__msgtype__))
    writer.close()


def _topic_map(tmp_path: Path, views=CAMERA_VIEWS) -> Path:
    lines = []
    for view in views:
        lines += [f'[topics."/{view.lower()}/image"]', 'sensor = "camera"',
                  f'buffer = "{view}"', ""]
    lines += ['[topics."/lidar_top/points"]', 'sensor = "lidar"', f'buffer = "{LIDAR}"']
    path = tmp_path / f"topics-{len(views)}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_a_ros2_bag_converts_exactly_and_the_daemon_accepts_it(tmp_path, storage):
    bag = tmp_path / "bag"
    _write_bag(bag, storage)
    topic_map = TopicMap.load(_topic_map(tmp_path))
    sources = [bag]
    if storage == "mcap":
        sources.append(next(bag.glob("*.mcap")))  # the bare ROS 2 MCAP file inside
    for source in sources:
        reader = RecordingReader(source, topic_map)
        assert reader.kind == ("rosbag2" if source == bag else "ros2-mcap")
        messages = [decode_sensor_message(i.parts, LimitsConfig()) for i in reader]
        cameras = [m for m in messages if m.sensor == "camera"]
        lidars = [m for m in messages if m.sensor == "lidar"]
        assert len(cameras) == len(lidars) == 3 and reader.skipped == {}
        for index, (camera, lidar) in enumerate(zip(cameras, lidars)):
            for view, pixels in _views(index).items():
                assert np.array_equal(camera.arrays[view], pixels), view
            assert np.array_equal(lidar.arrays[LIDAR], _points(index))  # NaN point removed
            assert camera.timestamp == pytest.approx(1700000000.0 + 0.5 * index)

    config = test_config(tmp_path, adaptation={"auto": False})
    with alarm(60), running_daemon(config) as daemon, \
            SensorPublisher(daemon.endpoints["ingest"]) as pub:
        result = replay(RecordingReader(bag, topic_map), lambda p: pub.send_parts(p, 5),
                        rate=None)
        assert result.sensor_sent == 6 and result.refused == {}
        with Client(daemon.endpoints["query"]) as client:
            wait_for(lambda: sum(_frames_in(client).values()) >= 6)
            counters = client.status()["counters"]
            assert counters["frames_in"] == {"camera": 3, "lidar": 3}
            assert counters["frames_dropped"] == {}
            assert client.ask("How many cars?")["frame_id"].startswith("ros-")


def test_ros2_problems_are_one_line_each(tmp_path):
    store, types = _ros_types()
    text = types["std_msgs/msg/String"](data="hello")
    depth = types["sensor_msgs/msg/Image"](header=_header(types, 1.0, "d"), height=2, width=2,
                                           encoding="16UC1", is_bigendian=0, step=4,
                                           data=np.zeros(8, np.uint8))
    bag = tmp_path / "bag"
    _write_bag(bag, "sqlite3", instants=2, extra=[("/chatter", text), ("/depth", depth)])
    full = _topic_map(tmp_path)

    with pytest.raises(RecordingError, match="needs a topic map.*/chatter") as err:
        list(RecordingReader(bag))
    assert "\n" not in str(err.value)
    missing = tmp_path / "missing.toml"
    missing.write_text(full.read_text() + '[topics."/radar"]\nsensor = "radar"\nbuffer = "R"\n')
    with pytest.raises(RecordingError, match="topic /radar .* is not in"):
        list(RecordingReader(bag, TopicMap.load(missing)))
    chatter = tmp_path / "chatter.toml"
    chatter.write_text(full.read_text() + '[topics."/chatter"]\nsensor = "x"\nbuffer = "y"\n')
    with pytest.raises(RecordingError, match="std_msgs/msg/String, which cannot be converted"):
        list(RecordingReader(bag, TopicMap.load(chatter)))
    bad_map = tmp_path / "bad.toml"
    bad_map.write_text('[topics."/a"]\nsensor = "camera"\n')
    with pytest.raises(ValueError, match="exactly sensor"):
        TopicMap.load(bad_map)

    # an image encoding that cannot become a camera view: skipped, named once, counted
    depth_map = tmp_path / "depth.toml"
    depth_map.write_text('[topics."/depth"]\nsensor = "camera"\nbuffer = "CAM_FRONT"\n')
    notices: list[str] = []
    reader = RecordingReader(bag, TopicMap.load(depth_map), notice=notices.append)
    assert list(reader) == []
    assert sum(reader.skipped.values()) == 2
    assert any("16UC1" in n and "cannot be converted" in n for n in notices)
    assert all("\n" not in n for n in notices)

    # one camera topic is not a camera message the protocol accepts: refused, not sent
    one = _topic_map(tmp_path, views=CAMERA_VIEWS[:1])
    sent: list = []
    result = replay(RecordingReader(bag, TopicMap.load(one)),
                    lambda p: sent.append(p) or True, rate=None, notice=notices.append)
    assert result.refused == {"buffer_mismatch": 2} and result.sensor_sent == 2
    assert all(json.loads(p[0])["sensor"] == "lidar" for p in sent)


# --- commands and the report -------------------------------------------------------------

def test_mpnp_replay_and_report_commands(recorded, tmp_path, capsys):
    from mpnp.cli import main

    directory, sent, answers = recorded
    truth = tmp_path / "truth.jsonl"
    # ground truth for every question, one of them answered wrongly
    truth.write_text("\n".join(json.dumps({
        "frame_id": a["frame_id"], "question": a["answer"].split("|")[0],
        "answer": "wrong" if k == 3 else a["answer"]}) for k, a in enumerate(answers)))
    assert main(["report", str(directory), "--out", str(tmp_path / "report"),
                 "--truth", str(truth)]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    png = tmp_path / "report" / "timeline.png"
    assert png.stat().st_size > 10_000
    assert "| camera | 10 | " in md and "| lidar | 10 | " in md
    assert "10 answered; daemon latency p50" in md
    assert "| all | 10 | 0.900 |" in md
    assert "`power.mode`: MODE_30W -> MODE_15W" in md

    config = test_config(tmp_path, adaptation={"auto": False})
    with alarm(60), running_daemon(config) as daemon:
        out = tmp_path / "replay.json"
        capsys.readouterr()
        code = main(["replay", str(directory), "--rate", "max",
                     "--ingest-endpoint", daemon.endpoints["ingest"],
                     "--endpoint", daemon.endpoints["query"], "--json", str(out)])
        printed = capsys.readouterr().out
        assert code == 0, printed
        assert f"{len(answers)} same answers, 0 different" in printed
        assert json.loads(out.read_text())["sensor_sent"] == len(sent)


def test_mpnp_record_sees_events_and_status_from_outside(tmp_path, capsys):
    import threading

    from mpnp.cli import main

    config = test_config(tmp_path, adaptation={"auto": False})
    with alarm(60), running_daemon(config) as daemon:
        codes: list[int] = []
        thread = threading.Thread(target=lambda: codes.append(main([
            "record", str(tmp_path / "outside"), "--endpoint", daemon.endpoints["query"],
            "--events-endpoint", daemon.endpoints["events"], "--duration", "1.5",
            "--status-interval", "0.2"])))
        thread.start()
        time.sleep(0.5)
        with Client(daemon.endpoints["query"]) as client:
            client.set_power_mode("MODE_15W")
        thread.join(10)
    assert codes == [0]
    items = list(RecordingReader(tmp_path / "outside"))
    kinds = {i.kind for i in items}
    assert {"status", "event", "recorder"} <= kinds and "sensor" not in kinds
    assert any(i.topic == "/mpnp/event/power.mode" and i.body["mode"] == "MODE_15W"
               for i in items)
    assert "recorded" in capsys.readouterr().out


def test_unreadable_input_is_one_line_from_the_commands(tmp_path, capsys):
    from mpnp.cli import main

    junk = tmp_path / "junk.mcap"
    junk.write_bytes(b"\x00" * 64)
    assert main(["replay", str(junk), "--no-questions"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpnp: error:") and "not an MCAP file" in err and "\n" not in err
    assert main(["report", str(junk)]) == 1
    assert "not an MCAP file" in capsys.readouterr().err


KILLED_WRITER = """
import sys, time
import numpy as np
from daemon.protocol import SensorKind, encode_sensor_message
from recording.writer import Recorder, RecordingSettings
recorder = Recorder(RecordingSettings(path=sys.argv[1], flush_interval_s=0.1,
                                      chunk_bytes=1 << 20))
for i in range(100000):
    points = np.random.default_rng(i).standard_normal((500, 4)).astype(np.float32)
    recorder.sensor([bytes(p) for p in encode_sensor_message(
        SensorKind.LIDAR, f"r{i:04d}", float(i), {"LIDAR_TOP": points})])
    print(i, flush=True)
    time.sleep(0.01)
"""


def test_a_killed_recorder_leaves_a_readable_file(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "0"
    time.sleep(1.0)
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=10)
    queued = 1 + len(out.split())
    notices: list[str] = []
    got = [i.parts for i in RecordingReader(tmp_path, notice=notices.append)]
    expected = [_wire(encode_sensor_message(
        SensorKind.LIDAR, f"r{i:04d}", float(i),
        {LIDAR: np.random.default_rng(i).standard_normal((500, 4)).astype(np.float32)}))
        for i in range(len(got))]
    assert got == expected  # what was flushed reads back whole and in order
    assert len(got) >= queued // 3, (len(got), queued)  # ~ the last flush interval lost
    assert all("\n" not in n for n in notices)


def test_recording_config_is_validated(tmp_path):
    from daemon.config import DaemonConfig

    assert DaemonConfig().recording.path == ""  # off by default
    for bad, message in (({"max_bytes": 0}, "max_bytes"), ({"max_files": -1}, "max_files"),
                         ({"chunk_bytes": 2**30}, "chunk_bytes"), ({"rotate": 3}, "unknown"),
                         ({"status_interval_s": 0}, "status_interval_s")):
        with pytest.raises(ValueError, match=message) as err:
            test_config(tmp_path, recording=bad)
        assert "[recording]" in str(err.value)
