"""``mpnp client ...`` against a live daemon, and the simulated vehicle's rates and schedule."""

from __future__ import annotations

import json
import threading
import time

import pytest
import zmq
from test_daemon_support import running_daemon, test_config, toy_frame, wait_for

from daemon.cli import add_commands
from daemon.protocol import SensorKind, decode_sensor_message, encode_sensor_message
from daemon.sim_vehicle import SimVehicle, SimVehicleConfig


def _client(capsys, endpoint: str, *argv: str, timeout: str = "5") -> tuple[int, str, str]:
    import argparse

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["client", "--endpoint", endpoint, "--timeout", timeout, *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_client_commands(tmp_path, capsys):
    with running_daemon(test_config(tmp_path)) as daemon:
        endpoint = daemon.endpoints["query"]
        parts = encode_sensor_message(SensorKind.CAMERA, "cli-0", 1.0,
                                      dict(toy_frame("cli-0").cameras))
        daemon.engine.ingest(decode_sensor_message([bytes(p) for p in parts],
                                                   daemon.config.limits))
        code, out, _ = _client(capsys, endpoint, "--json", "status")
        assert code == 0 and json.loads(out)["serving"]["modalities"] == ["camera"]
        wait_for(lambda: daemon.metrics.frames_in.total() >= 1)
        code, out, _ = _client(capsys, endpoint, "ask", "how many cars?")
        assert code == 0 and out.startswith("how many cars?|camera|v0|cli-0") and "ms]" in out
        code, out, _ = _client(capsys, endpoint, "power-mode")
        assert code == 0 and out.startswith("MODE_30W (modes: MAXN, MODE_15W")
        code, out, _ = _client(capsys, endpoint, "power-mode", "MODE_50W")
        assert code == 0 and out.strip() == "MODE_50W: applied"
        code, out, _ = _client(capsys, endpoint, "modality", "forced", "camera", "lidar")
        assert code == 0 and "desired ['camera', 'lidar']" in out
        code, out, _ = _client(capsys, endpoint, "--json", "store")
        assert code == 0 and json.loads(out)["entries"][0]["kind"] == "state"
        code, _, err = _client(capsys, endpoint, "power-mode", "MODE_9W")
        assert code == 1 and "power_error" in err
    code, _, err = _client(capsys, "tcp://127.0.0.1:1", "ping", timeout="0.3")
    assert code == 3 and "is the daemon running" in err


def test_client_live_sample_commands(tmp_path, capsys):
    with running_daemon(test_config(tmp_path)) as daemon:
        endpoint = daemon.endpoints["query"]
        for sensor, arrays in (("camera", dict(toy_frame("cli-1").cameras)),
                               ("lidar", {"LIDAR_TOP": toy_frame("cli-1").lidar})):
            parts = encode_sensor_message(sensor, "cli-1", 1.0, arrays)
            daemon.engine.ingest(decode_sensor_message([bytes(p) for p in parts],
                                                       daemon.config.limits))
        boxes = tmp_path / "boxes.json"
        boxes.write_text(json.dumps([{"class": "bus", "status": "moving", "x": 9, "y": 0,
                                      "z": 0, "length": 11, "width": 2.8, "height": 3.2,
                                      "yaw": 0}]))
        code, out, _ = _client(capsys, endpoint, "objects", "cli-1", str(boxes),
                               "--questions-per-frame", "5", "--context", "night")
        assert code == 0 and out.strip() == ("stored 5 samples of frame cli-1 in 'night' "
                                             "(5 buffered)")
        code, out, _ = _client(capsys, endpoint, "teach", "cli-1", "Is it foggy?", "no",
                               "--context", "night")
        assert code == 0 and "(6 buffered)" in out
        code, out, _ = _client(capsys, endpoint, "--json", "pseudo-label", "cli-1",
                               "--questions-per-frame", "2", "--context", "night")
        assert code == 0 and json.loads(out)["stored"] == 2
        boxes.write_text("[{")
        code, _, err = _client(capsys, endpoint, "objects", "cli-1", str(boxes))
        assert code == 2 and "not JSON" in err
        boxes.write_text('[{"class": "tank"}]')
        code, _, err = _client(capsys, endpoint, "objects", "cli-1", str(boxes))
        assert code == 1 and "bad_request" in err and "objects[0].class" in err


class _CountingSource:
    def __init__(self):
        self.lights = []

    def frame(self, index, light):
        self.lights.append(light)
        return toy_frame(f"v{index}", light=light)


class _SlowSource:
    """Renders a frame in 0.25 s: five LiDAR periods."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at

    def frame(self, index, light):
        time.sleep(0.25)
        if index == self.fail_at:
            raise RuntimeError("renderer broke")
        return toy_frame(f"slow{index}", light=light)


def _pull_counter():
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    counts = {"camera": 0, "lidar": 0}

    def receive():
        while not stop.is_set():
            if pull.poll(50):
                counts[json.loads(pull.recv_multipart()[0])["sensor"]] += 1

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join()
        pull.close()

    return f"tcp://127.0.0.1:{port}", counts, close


def test_sim_vehicle_keeps_sensor_rates_when_rendering_is_slower_than_a_tick():
    endpoint, counts, close = _pull_counter()
    config = SimVehicleConfig(endpoint=endpoint, camera_hz=12, lidar_hz=20, duration_s=2.0,
                              world_interval_s=0.1, loop=False, hwm=1000)
    stats = SimVehicle(config, _SlowSource()).run()
    close()
    rates = stats.rates()
    assert rates["lidar_hz"] == pytest.approx(20, rel=0.15)
    assert rates["camera_hz"] == pytest.approx(12, rel=0.15)
    assert stats.late_frames > 0  # frames were due every 0.1 s and took 0.25 s
    assert 2 <= stats.world_frames <= 12


def test_sim_vehicle_raises_the_sources_error():
    endpoint, _counts, close = _pull_counter()
    config = SimVehicleConfig(endpoint=endpoint, duration_s=5.0, world_interval_s=0.1)
    try:
        with pytest.raises(RuntimeError, match="renderer broke"):
            SimVehicle(config, _SlowSource(fail_at=1)).run()
    finally:
        close()


def test_sim_vehicle_rates_and_day_dusk_night():
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    counts = {"camera": 0, "lidar": 0}
    stop = threading.Event()

    def receive():
        while not stop.is_set():
            if pull.poll(50):
                header = json.loads(pull.recv_multipart()[0])
                counts[header["sensor"]] += 1

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    config = SimVehicleConfig(endpoint=f"tcp://127.0.0.1:{port}", camera_hz=12, lidar_hz=20,
                              duration_s=2.0, day_s=0.8, dusk_s=0.4, night_s=10,
                              world_interval_s=0.1, loop=False)
    source = _CountingSource()
    stats = SimVehicle(config, source).run()
    stop.set()
    receiver.join()
    pull.close()
    rates = stats.rates()
    assert rates["camera_hz"] == pytest.approx(12, rel=0.15)
    assert rates["lidar_hz"] == pytest.approx(20, rel=0.15)
    assert counts["camera"] == stats.camera_sent and counts["lidar"] == stats.lidar_sent
    assert source.lights[0] == 1.0 and source.lights[-1] == config.night_light
    assert any(config.night_light < x < 1.0 for x in source.lights)  # the dusk ramp
    assert config.light_at(1.0) == pytest.approx(0.5 * (1.0 + config.night_light), rel=0.3)


def test_the_demo_asks_only_about_frames_the_vehicle_has_already_sent():
    """The renderer works ahead of the sensors, so the newest frames the source handed out
    are not on the wire yet: the demo's questions must skip them (frame_not_found before)."""
    import dataclasses

    from daemon.demo import DemoFrameSource
    from scenes.synthetic import WorldConfig

    world = dataclasses.asdict(WorldConfig(image_height=32, image_width=56, lidar_width=128))
    source = DemoFrameSource(world)
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    received: set[str] = set()
    stop = threading.Event()

    def receive():
        while not stop.is_set():
            if pull.poll(20):
                received.add(json.loads(pull.recv_multipart()[0])["frame_id"])

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    config = SimVehicleConfig(endpoint=f"tcp://127.0.0.1:{port}", duration_s=3.0,
                              world_interval_s=0.1, loop=False, hwm=1000)
    vehicle = threading.Thread(target=SimVehicle(config, source).run, daemon=True)
    vehicle.start()
    asked, missing = 0, 0
    while vehicle.is_alive():
        recent = source.recent()
        if recent is not None:
            asked += 1
            missing += recent[0] not in received
        time.sleep(0.03)
    stop.set()
    receiver.join()
    pull.close()
    assert asked > 20
    assert missing <= asked * 0.05, f"{missing} of {asked} asked-about frames not sent yet"
