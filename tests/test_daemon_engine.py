"""The engine's behaviour through a live daemon (toy backend): queries first and answered with
the last good state during adaptation, swap only when better (or forced), re-planning on a
power-mode change, status, events, Prometheus metrics, the store, systemd and shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_daemon_support import ToyBackend, running_daemon, test_config, toy_frame, wait_for

from daemon.client import Client, DaemonError, EventSubscriber, SensorPublisher
from daemon.logs import JsonFormatter
from daemon.store import EntryKind, ModelStore, StoreError

ROOT = Path(__file__).resolve().parents[1]


def _feed(publisher: SensorPublisher, frame_id: str, light: float, t: float) -> None:
    frame = toy_frame(frame_id, timestamp=t, light=light)
    publisher.send_camera(frame)
    publisher.send_lidar(frame)


def _events_until(sub: EventSubscriber, kind: str, timeout: float = 10.0) -> list:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = sub.receive(0.1)
        if event is not None:
            seen.append(event)
            if event[0].value == kind:
                return seen
    raise AssertionError(f"no {kind} event; saw {[e[0].value for e in seen]}")


def test_queries_are_answered_with_the_last_good_state_during_adaptation(tmp_path):
    backend = ToyBackend(step_delay_s=0.03)
    config = test_config(tmp_path, adaptation={"target_steps": 30})
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client, \
            SensorPublisher(daemon.endpoints["ingest"], hwm=50) as publisher, \
            EventSubscriber(daemon.endpoints["events"]) as events:
        time.sleep(0.2)  # let the subscription reach the daemon
        for i in range(3):
            _feed(publisher, f"d{i}", 1.0, float(i))
        wait_for(lambda: daemon.metrics.frames_in.total() >= 6)
        assert client.ask("q")["answer"] == "q|camera|v0|d2"
        for i in range(3, 8):  # night falls: the light-level policy wants LiDAR
            _feed(publisher, f"n{i}", 0.0, float(i))
        wait_for(lambda: client.status()["adaptation"] is not None)
        during = []
        while True:
            reply = client.ask("q")
            if reply["state_generation"] != 1:  # the run ended and was swapped in
                break
            during.append(reply)
            assert reply["modalities"] == ["camera"] and "|v0|" in reply["answer"]
            assert reply["latency_s"] < 0.5  # a step or so (the whole run would be ~0.9 s)
        assert len(during) >= 5
        reply = client.ask("q")
        assert reply["modalities"] == ["lidar"] and "|v1|" in reply["answer"]
        assert reply["state_generation"] == 2  # 1 is the initial (shipped) state
        seen = [e[0].value for e in _events_until(events, "modality.switched")]
        for kind in ("context.changed", "budget.plan", "adaptation.started",
                     "adaptation.progress", "adaptation.result"):
            assert kind in seen, (kind, seen)
        status = client.status()
        assert status["last_adaptation"]["outcome"] == "better"
        assert status["last_adaptation"]["adapted_accuracy"] == 0.8
        assert status["budget"]["last"]["n_blocks"] == 8
        assert status["latency"]["count"] >= 7
        assert status["counters"]["frames_in"]["camera"] >= 6


def test_a_worse_candidate_is_discarded_unless_forced(tmp_path):
    backend = ToyBackend(adapted_accuracy=0.3, serving_accuracy=0.5)
    with running_daemon(test_config(tmp_path), backend) as daemon, \
            Client(daemon.endpoints["query"]) as client, \
            SensorPublisher(daemon.endpoints["ingest"], hwm=50) as publisher:
        _feed(publisher, "f0", 1.0, 0.0)
        client.set_modality("forced", ["lidar"])
        wait_for(lambda: (client.status()["last_adaptation"] or {}).get("outcome"))
        status = client.status()
        assert status["last_adaptation"]["outcome"] == "not_better"
        assert status["serving"]["modalities"] == ["camera"] and backend.version == 0
        time.sleep(0.2)
        assert ("start", ("lidar",), 8, 20) in backend.calls
        assert sum(c[0] == "start" for c in backend.calls) == 1, "retried a losing adaptation"
        client.adapt("start", ["lidar"], force_commit=True)
        wait_for(lambda: client.status()["serving"]["modalities"] == ["lidar"])
        assert client.status()["last_adaptation"]["outcome"] == "forced"
        assert backend.version == 1
        entries = client.list_store()["entries"]
        assert [e["meta"]["modalities"] for e in entries] == [["camera"], ["lidar"]]


def test_operator_stop_keeps_serving_state(tmp_path):
    backend = ToyBackend(step_delay_s=0.02)
    with running_daemon(test_config(tmp_path, adaptation={"auto": False}), backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        client.adapt("start", ["lidar"])
        with pytest.raises(DaemonError, match="conflict"):
            client.adapt("start", ["lidar"])
        result = client.adapt("stop")["result"]
        assert result["outcome"] == "cancelled" and not result["committed"]
        assert client.status()["serving"]["modalities"] == ["camera"]
        assert backend.calls[-1] == ("discard",)


def test_power_mode_change_mid_run_replans(tmp_path):
    backend = ToyBackend(step_delay_s=0.02)
    config = test_config(tmp_path, adaptation={"auto": False, "target_steps": 60},
                         power={"options": {"switch_delay_s": 0.1, "flops_scale": 1e-4,
                                            "reboot_modes": ["MAXN"]}})
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        plan = client.adapt("start", ["lidar"])["plan"]
        assert plan["mode"] == "MODE_30W" and plan["feasible"]
        reply = client.set_power_mode("MODE_15W")  # asynchronous: the reply waits for it
        assert reply == {"target": "MODE_15W", "status": "applied", "message": ""}
        wait_for(lambda: any(d["replan"] for d in client.status()["budget"]["decisions"]))
        status = client.status()
        replan = [d for d in status["budget"]["decisions"] if d["replan"]][-1]
        assert replan["mode"] == "MODE_15W" and replan["n_blocks"] == plan["n_blocks"]
        assert "MODE_15W" in replan["reason"]
        assert status["power"]["mode"]["name"] == "MODE_15W"
        assert any(c[0] == "total" for c in backend.calls)
        reboot = client.set_power_mode("MAXN")
        assert reboot["status"] == "needs_reboot"
        assert client.status()["power"]["mode"]["name"] == "MODE_15W"


def test_infeasible_budget_waits_for_a_bigger_power_mode(tmp_path):
    backend = ToyBackend()
    config = test_config(tmp_path, power={"options": {"switch_delay_s": 0.0,
                                                      "initial_mode": "MODE_15W",
                                                      "flops_scale": 1e-9}})
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        with pytest.raises(DaemonError, match="power_error.*waiting for a larger power mode"):
            client.adapt("start", ["lidar"])
        assert not any(c[0] == "start" for c in backend.calls)


def test_prometheus_endpoint(tmp_path):
    with running_daemon(test_config(tmp_path)) as daemon, \
            Client(daemon.endpoints["query"]) as client, \
            SensorPublisher(daemon.endpoints["ingest"]) as publisher:
        _feed(publisher, "m0", 1.0, 0.0)
        wait_for(lambda: daemon.metrics.frames_in.total() >= 2)
        client.ask("q")
        host, port = daemon.metrics_address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        assert 'mpnp_frames_received_total{sensor="camera"} 1' in text
        assert "mpnp_queries_total 1" in text
        assert 'mpnp_query_latency_seconds_bucket{le="+Inf"} 1' in text
        assert "mpnp_query_latency_seconds_count 1" in text
        for name in ("mpnp_adaptation_progress", "mpnp_power_watts", "mpnp_frames_dropped_total",
                     "mpnp_errors_total"):
            assert f"# TYPE {name}" in text
        watts = float(next(line.split()[1] for line in text.splitlines()
                           if line.startswith("mpnp_power_watts")))
        assert watts == pytest.approx(30.0 * 0.35)  # sim-orin idle in MODE_30W
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://{host}:{port}/other", timeout=5)


def test_resumes_from_the_newest_good_state_and_skips_a_corrupt_one(tmp_path, caplog):
    config = test_config(tmp_path, policy={"name": "fixed", "options": {"modalities": ["lidar"]}})
    store = ModelStore(config.store.directory)
    for version, modalities in ((3, ["lidar"]), (4, ["camera", "lidar"])):
        backend = ToyBackend()
        backend.version = version
        store.save_state(backend.save_state, {"modalities": modalities})
    newest = store.states()[0]
    store.path(newest).write_bytes(b"garbage")  # corrupt generation 2
    store.close()
    backend = ToyBackend()
    with running_daemon(config, backend) as daemon, Client(daemon.endpoints["query"]) as client:
        status = client.status()
        assert status["serving"] == {"modalities": ["lidar"], "generation": 1, "source": None,
                                     "composition": None, "finetuned_from": None}
        assert backend.version == 3
        assert any("corrupt" in r.getMessage() for r in caplog.records)


def test_store_errors_name_the_entry_and_budget_evicts(tmp_path):
    import numpy as np

    store = ModelStore(tmp_path / "store", memory_budget_bytes=3000)
    for name in ("a", "b", "c"):
        store.put_arrays(name, EntryKind.ALIGNER, {"w": np.zeros(250, np.float32)})  # 1000 B
    store.load("a")
    store.load("b")
    store.load("c")
    store.load("a")  # touch: b is now least recently used
    store.put_arrays("d", EntryKind.ENCODER, {"w": np.zeros(250, np.float32)})
    store.load("d")
    assert store.cached() == ["c", "a", "d"] and store.memory_used == 3000
    with pytest.raises(StoreError, match="no entry 'nope'"):
        store.load("nope")
    store.path(store.get("c")).write_bytes(b"x")
    store._cache.clear()
    with pytest.raises(StoreError, match="'c'.*corrupt.*re-save"):
        store.load("c")
    store.path(store.get("b")).unlink()
    with pytest.raises(StoreError, match="'b'.*missing"):
        store.load("b")
    assert np.array_equal(store.load("a")["w"], np.zeros(250, np.float32))
    store.close()


def test_json_logs_are_one_object_per_line():
    import logging

    record = logging.LogRecord("daemon.x", logging.WARNING, __file__, 1, "drop %d", (3,), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "WARNING" and entry["message"] == "drop 3"
    assert entry["logger"] == "daemon.x" and entry["time"].endswith("Z")


def test_systemd_ready_watchdog_and_clean_sigterm_shutdown(tmp_path):
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    ipc = tmp_path / "s"
    ipc.mkdir()
    config = {
        "endpoints": {"ingest": f"ipc://{ipc}/i", "query": f"ipc://{ipc}/q",
                      "events": f"ipc://{ipc}/e", "metrics": ""},
        "model": {"backend": "test_daemon_support:make_toy_backend",
                  "options": {"step_delay_s": 0.05}},
        "store": {"path": str(tmp_path / "store")},
        "power": {"monitor": "sim-orin"},
        "adaptation": {"auto": False, "target_steps": 200, "min_steps": 1},
        "log_format": "json",
    }
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "-v", "--config", str(path)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        watchdogs = 0
        while watchdogs < 3:  # WATCHDOG=1 keeps coming from the main loop
            watchdogs += notify.recv(4096).decode() == "WATCHDOG=1"
        with Client(f"ipc://{ipc}/q") as client:
            client.adapt("start", ["lidar"])  # SIGTERM lands in the middle of a run
            wait_for(lambda: client.status()["adaptation"]["steps_done"] >= 1)
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in notify.recv(4096).decode():
            pass
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in lines]
    assert any("cancelled" in m for m in messages), messages
    assert messages[-1] == "daemon stopped"
    store = ModelStore(tmp_path / "store")  # the lock was released
    store.close()
