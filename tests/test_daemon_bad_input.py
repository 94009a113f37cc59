"""Bad input never takes the daemon down: each kind gets an error reply (requests) or a
counted drop (sensor ingest) plus a log line, and the daemon keeps answering correctly."""

from __future__ import annotations

import json
import logging
import uuid

import numpy as np
import pytest
import zmq
from test_daemon_support import ToyBackend, running_daemon, test_config, toy_frame, wait_for

from daemon.client import Client, DaemonError, SensorPublisher
from daemon.protocol import PROTOCOL_TAG, MessageType, SensorKind, encode_sensor_message
from scenes.sample import CAMERA_VIEWS, LIDAR


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One daemon for the module (cheap tests share it; counters are compared as deltas)."""
    tmp = tmp_path_factory.mktemp("bad-input")
    backend = ToyBackend()
    config = test_config(tmp, limits={"max_header_bytes": 2048, "max_request_bytes": 4096,
                                      "max_frame_bytes": 1 << 20})
    with running_daemon(config, backend) as daemon:
        with Client(daemon.endpoints["query"], timeout_s=5) as client, \
                SensorPublisher(daemon.endpoints["ingest"], hwm=100) as publisher:
            yield daemon, client, publisher, backend


def _dropped(daemon, reason: str) -> float:
    return daemon.metrics.frames_dropped.value(reason=reason)


def _assert_still_serving(live) -> None:
    """A fresh, valid frame arrives and a question about it gets the right answer."""
    daemon, client, publisher, backend = live
    frame_id = f"good-{uuid.uuid4().hex[:8]}"
    frame = toy_frame(frame_id, timestamp=1e9 + daemon.metrics.frames_in.total())
    assert publisher.send_camera(frame) and publisher.send_lidar(frame)
    wait_for(lambda: getattr(daemon.engine.frames.latest(SensorKind.CAMERA), "frame_id", None)
             == frame_id)
    reply = client.ask("how many cars are there?", frame_id)
    assert reply["answer"] == f"how many cars are there?|camera|v{backend.version}|{frame_id}"
    assert reply["modalities"] == ["camera"] and reply["frame_id"] == frame_id


def _good_camera(frame_id: str = "c", timestamp: float = 1.0) -> dict[str, np.ndarray]:
    return dict(toy_frame(frame_id, timestamp).cameras)


def _send_bad(live, parts, reason: str, caplog) -> None:
    daemon, _, publisher, _ = live
    before = _dropped(daemon, reason)
    with caplog.at_level(logging.WARNING, logger="daemon.server"):
        assert publisher.send_parts(parts)
        wait_for(lambda: _dropped(daemon, reason) == before + 1)
        # the log line follows the count
        wait_for(lambda: any(reason in r.getMessage() for r in caplog.records))
    _assert_still_serving(live)


# --- sensor ingest ----------------------------------------------------------------------------

def test_malformed_header_is_dropped(live, caplog):
    parts = encode_sensor_message(SensorKind.CAMERA, "x", 1.0, _good_camera())
    _send_bad(live, [b"{not json", *parts[1:]], "bad_header", caplog)


def test_header_missing_fields_is_dropped(live, caplog):
    header = {"v": 1, "sensor": "camera", "timestamp": 1.0, "buffers": []}  # no frame_id
    _send_bad(live, [json.dumps(header).encode()], "bad_header", caplog)


def test_oversized_header_is_dropped(live, caplog):
    parts = encode_sensor_message(SensorKind.CAMERA, "x", 1.0, _good_camera())
    header = json.loads(bytes(parts[0]))
    header["padding"] = "x" * 4000  # over max_header_bytes = 2048
    _send_bad(live, [json.dumps(header).encode(), *parts[1:]], "header_too_large", caplog)


def test_unsupported_header_version_is_dropped(live, caplog):
    parts = encode_sensor_message(SensorKind.CAMERA, "x", 1.0, _good_camera())
    header = json.loads(bytes(parts[0]))
    header["v"] = 99
    _send_bad(live, [json.dumps(header).encode(), *parts[1:]], "unsupported_version", caplog)


def test_wrong_dtype_is_dropped(live, caplog):
    cameras = {v: a.astype(np.float32) for v, a in _good_camera().items()}
    parts = encode_sensor_message(SensorKind.CAMERA, "x", 1.0, cameras)
    _send_bad(live, parts, "bad_dtype", caplog)


def test_lidar_wrong_dtype_is_dropped(live, caplog):
    parts = encode_sensor_message(SensorKind.LIDAR, "x", 1.0, {LIDAR: np.zeros((8, 4))})
    _send_bad(live, parts, "bad_dtype", caplog)


def test_wrong_camera_shape_is_dropped(live, caplog):
    cameras = {v: np.zeros((8, 12, 4), np.uint8) for v in CAMERA_VIEWS}  # RGBA
    _send_bad(live, encode_sensor_message(SensorKind.CAMERA, "x", 1.0, cameras), "bad_shape",
              caplog)


def test_wrong_lidar_shape_is_dropped(live, caplog):
    parts = encode_sensor_message(SensorKind.LIDAR, "x", 1.0,
                                  {LIDAR: np.zeros((8, 3), np.float32)})
    _send_bad(live, parts, "bad_shape", caplog)


def test_mismatched_camera_views_are_dropped(live, caplog):
    cameras = _good_camera()
    cameras[CAMERA_VIEWS[0]] = np.zeros((16, 12, 3), np.uint8)
    _send_bad(live, encode_sensor_message(SensorKind.CAMERA, "x", 1.0, cameras), "bad_shape",
              caplog)


def test_truncated_buffer_is_dropped(live, caplog):
    parts = encode_sensor_message(SensorKind.LIDAR, "x", 1.0,
                                  {LIDAR: np.zeros((8, 4), np.float32)})
    _send_bad(live, [parts[0], bytes(parts[1])[:-5]], "truncated", caplog)


def test_missing_buffer_is_dropped(live, caplog):
    parts = encode_sensor_message(SensorKind.CAMERA, "x", 1.0, _good_camera())
    _send_bad(live, parts[:-1], "buffer_mismatch", caplog)


def test_oversized_buffer_is_dropped(live, caplog):
    big = np.zeros((100_000, 4), np.float32)  # 1.6 MB > max_frame_bytes = 1 MiB
    _send_bad(live, encode_sensor_message(SensorKind.LIDAR, "x", 1.0, {LIDAR: big}),
              "too_large", caplog)


def test_unknown_sensor_is_dropped(live, caplog):
    header = {"v": 1, "sensor": "sonar", "frame_id": "x", "timestamp": 1.0, "buffers": []}
    _send_bad(live, [json.dumps(header).encode()], "unknown_sensor", caplog)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_lidar_is_dropped(live, caplog, bad):
    points = np.ones((8, 4), np.float32)
    points[3, 1] = bad
    _send_bad(live, encode_sensor_message(SensorKind.LIDAR, "x", 1.0, {LIDAR: points}),
              "non_finite", caplog)


def test_non_finite_timestamp_is_dropped(live, caplog):
    parts = encode_sensor_message(SensorKind.CAMERA, "x", 1.0, _good_camera())
    header = bytes(parts[0]).replace(b'"timestamp":1.0', b'"timestamp":NaN')
    assert b"NaN" in header
    _send_bad(live, [header, *parts[1:]], "non_finite", caplog)


def test_out_of_order_frame_is_dropped_as_stale(live):
    daemon, _, publisher, _ = live
    _assert_still_serving(live)  # sets a recent camera timestamp
    before = _dropped(daemon, "stale")
    assert publisher.send_camera(toy_frame("old", timestamp=0.5))
    wait_for(lambda: _dropped(daemon, "stale") == before + 1)
    assert daemon.engine.frames.latest(SensorKind.CAMERA).frame_id != "old"
    _assert_still_serving(live)


# --- requests ---------------------------------------------------------------------------------

def _raw(live, frames: list[bytes], code: str) -> str:
    daemon, client, _, _ = live
    before = daemon.metrics.errors.value(code=code)
    with pytest.raises(DaemonError) as info:
        client.request_raw([b"", *frames])
    assert info.value.code == code
    assert daemon.metrics.errors.value(code=code) == before + 1
    _assert_still_serving(live)
    return info.value.message


def _body(**fields) -> bytes:
    return json.dumps({"id": uuid.uuid4().hex, **fields}).encode()


def test_unknown_command_gets_error_reply(live, caplog):
    with caplog.at_level(logging.WARNING, logger="daemon.server"):
        message = _raw(live, [PROTOCOL_TAG, b"self_destruct", _body()], "unknown_command")
    assert "self_destruct" in message and "query" in message
    assert any("unknown_command" in r.getMessage() for r in caplog.records)


def test_wrong_protocol_version_gets_error_reply(live):
    _raw(live, [b"MPNP/9", b"query", _body(question="q")], "unsupported_version")


def test_wrong_framing_gets_error_reply(live):
    _raw(live, [PROTOCOL_TAG, b"query"], "bad_framing")


def test_non_json_body_gets_error_reply(live):
    _raw(live, [PROTOCOL_TAG, b"query", b"\x80\x04pickle?"], "bad_request")


def test_pickle_payload_is_not_unpickled(live, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _raw(live, [PROTOCOL_TAG, b"query", pickle.dumps(Evil())], "bad_request")
    assert not marker.exists()


def test_oversized_request_gets_error_reply(live):
    _raw(live, [PROTOCOL_TAG, b"query", _body(question="x" * 5000)], "too_large")


def test_missing_request_id_gets_error_reply(live):
    _raw(live, [PROTOCOL_TAG, b"status", b"{}"], "bad_request")


@pytest.mark.parametrize("body", [
    {"question": ""},
    {"question": 42},
    {"question": "q", "unexpected": 1},
    {"question": "q", "frame_id": 7},
])
def test_bad_query_fields_get_error_reply(live, body):
    _raw(live, [PROTOCOL_TAG, b"query", _body(**body)], "bad_request")


def test_unknown_frame_id_gets_error_reply(live):
    message = _raw(live, [PROTOCOL_TAG, b"query", _body(question="q", frame_id="nope")],
                   "frame_not_found")
    assert "nope" in message


@pytest.mark.parametrize("kind,body,code", [
    ("set_modality", {"mode": "forced", "modalities": ["sonar"]}, "bad_request"),
    ("set_modality", {"mode": "sometimes"}, "bad_request"),
    ("adapt", {"action": "explode"}, "bad_request"),
    ("adapt", {"action": "stop"}, "conflict"),
    ("set_power_mode", {"mode": "MODE_1000W"}, "power_error"),
    ("status", {"extra": True}, "bad_request"),
])
def test_bad_control_commands_get_error_reply(live, kind, body, code):
    _raw(live, [PROTOCOL_TAG, kind.encode(), _body(**body)], code)


def test_backend_failure_is_an_error_reply_and_serving_continues(live, monkeypatch):
    daemon, client, _, backend = live
    _assert_still_serving(live)

    def broken(*args, **kwargs):
        raise RuntimeError("model exploded")

    monkeypatch.setattr(backend, "answer", broken)
    with pytest.raises(DaemonError) as info:
        client.ask("q")
    assert info.value.code == "backend_error" and "model exploded" in info.value.message
    monkeypatch.undo()
    _assert_still_serving(live)


def test_garbage_on_the_wire_from_raw_socket(live):
    """A peer speaking something else entirely (one random frame) gets an error reply."""
    daemon, _, _, _ = live
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(daemon.endpoints["query"])
    try:
        sock.send_multipart([np.random.default_rng(0).bytes(64)])
        assert sock.poll(5000)
        reply = sock.recv_multipart()
        assert reply[0] == PROTOCOL_TAG and reply[1] == b"error"
        assert json.loads(reply[2])["code"] == "bad_framing"
    finally:
        sock.close()
    _assert_still_serving(live)


def test_status_reports_the_drops_and_errors(live):
    _, client, _, _ = live
    status = client.request(MessageType.STATUS)
    assert status["counters"]["frames_dropped"]["bad_header"] >= 1
    assert status["counters"]["errors"]["unknown_command"] >= 1
    assert status["counters"]["queries"] >= 1
