"""Binding rules and CURVE: loopback/ipc by default, CURVE required elsewhere, clients without
an authorized key are refused; nothing from the wire is unpickled."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_daemon_support import running_daemon, test_config, toy_frame, wait_for

from daemon.client import Client, DaemonTimeout, EventSubscriber, SensorPublisher
from daemon.config import DaemonConfig, endpoint_is_local
from daemon.protocol import EventType
from daemon.security import generate_keys

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("endpoint,local", [
    ("tcp://127.0.0.1:5556", True), ("tcp://localhost:1", True), ("ipc:///run/x.sock", True),
    ("tcp://[::1]:5", True), ("tcp://0.0.0.0:5556", False), ("tcp://192.168.1.5:5556", False),
    ("tcp://*:5556", False),
])
def test_endpoint_locality(endpoint, local):
    assert endpoint_is_local(endpoint) is local


def test_non_loopback_bind_without_curve_is_refused():
    with pytest.raises(ValueError, match="endpoints.query.*CURVE"):
        DaemonConfig.from_dict({"endpoints": {"query": "tcp://0.0.0.0:5556"}})


def test_curve_without_keys_is_refused():
    with pytest.raises(ValueError, match="server_secret_key"):
        DaemonConfig.from_dict({"security": {"curve": True}})


def test_metrics_endpoint_must_stay_on_loopback():
    with pytest.raises(ValueError, match="loopback"):
        DaemonConfig.from_dict({"endpoints": {"metrics": "0.0.0.0:9464"}})


def test_defaults_bind_loopback_only():
    config = DaemonConfig()
    for name in ("ingest", "query", "events"):
        assert endpoint_is_local(getattr(config.endpoints, name))


@pytest.fixture
def curve_daemon(tmp_path):
    keys = generate_keys(tmp_path / "keys", ("server", "client", "intruder"))
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    shutil.copy(keys["client"][0], authorized)
    config = test_config(tmp_path, security={
        "curve": True, "server_secret_key": str(keys["server"][1]),
        "client_keys_dir": str(authorized),
    })
    with running_daemon(config) as daemon:
        yield daemon, keys


def test_curve_client_with_authorized_key_is_served(curve_daemon):
    daemon, keys = curve_daemon
    curve = {"server_key": keys["server"][0], "client_cert": keys["client"][1]}
    with Client(daemon.endpoints["query"], timeout_s=5, **curve) as client, \
            SensorPublisher(daemon.endpoints["ingest"], **curve) as publisher, \
            EventSubscriber(daemon.endpoints["events"], [EventType.CONTEXT_CHANGED],
                            **curve) as events:
        assert client.ping()["pong"] is True
        frame = toy_frame("secure", timestamp=1.0)
        wait_for(lambda: publisher.send_camera(frame) and daemon.metrics.frames_in.total() > 0)
        assert client.ask("q")["answer"].startswith("q|camera|v0|secure")
        client.set_modality("forced", ["lidar"])
        event = events.receive(5)
        if event and event[1]["desired"] == ["camera"]:  # the startup event came first
            event = events.receive(5)
        assert event is not None and event[1]["desired"] == ["lidar"], event


def test_curve_client_without_key_is_refused(curve_daemon):
    daemon, _ = curve_daemon
    with Client(daemon.endpoints["query"], timeout_s=0.5) as client:
        with pytest.raises(DaemonTimeout):
            client.ping()


def test_curve_client_with_unauthorized_key_is_refused(curve_daemon):
    daemon, keys = curve_daemon
    with Client(daemon.endpoints["query"], timeout_s=0.5, server_key=keys["server"][0],
                client_cert=keys["intruder"][1]) as client:
        with pytest.raises(DaemonTimeout):
            client.ping()


def test_curve_ingest_from_unauthorized_publisher_is_ignored(curve_daemon):
    daemon, keys = curve_daemon
    with SensorPublisher(daemon.endpoints["ingest"], server_key=keys["server"][0],
                         client_cert=keys["intruder"][1]) as publisher:
        for i in range(5):
            publisher.send_camera(toy_frame(f"x{i}", timestamp=float(i)))
        with Client(daemon.endpoints["query"], timeout_s=5, server_key=keys["server"][0],
                    client_cert=keys["client"][1]) as client:
            client.ping()
    assert daemon.metrics.frames_in.total() == 0


def test_nothing_in_the_daemon_unpickles():
    """No pickle, no ``recv_pyobj``, no ``torch.load`` without ``weights_only`` in daemon code."""
    pattern = re.compile(r"\bimport pickle\b|pickle\.loads?\(|recv_pyobj|recv_serialized|"
                         r"torch\.load\((?![^)]*weights_only=True)")
    offenders = []
    for folder in ("daemon", "policies"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
