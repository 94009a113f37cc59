"""Operators' tools: ``/metrics`` (prometheus-client), ``/healthz``, measured latency
quantiles, the client CLI (flags after the action, exit codes, human output) and the
torch-free client install."""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_daemon_support import running_daemon, test_config, toy_frame, wait_for

from daemon.cli import EXIT_DAEMON_ERROR, EXIT_TIMEOUT, EXIT_USAGE, add_commands
from daemon.client import Client, SensorPublisher

ROOT = Path(__file__).resolve().parents[1]


def _get(host: str, port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    config = test_config(tmp_path_factory.mktemp("ops"))
    with running_daemon(config) as daemon, Client(daemon.endpoints["query"]) as client, \
            SensorPublisher(daemon.endpoints["ingest"]) as publisher:
        frame = toy_frame("ops-0", timestamp=1.0)
        publisher.send_camera(frame)
        publisher.send_lidar(frame)
        wait_for(lambda: daemon.metrics.frames_in.total() >= 2)
        for _ in range(5):
            client.ask("how many cars?")
        yield daemon, client


def test_metrics_are_prometheus_client_text_with_process_collectors(live):
    daemon, _ = live
    daemon.metrics.errors.inc(code='odd "code"\\with\nnewline')  # escaping is the library's
    status, content_type, text = _get(*daemon.metrics_address, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert 'mpnp_errors_total{code="odd \\"code\\"\\\\with\\nnewline"} 1.0' in text
    assert "process_resident_memory_bytes" in text and "python_info" in text
    assert 'mpnp_frames_received_total{sensor="camera"} 1.0' in text
    assert "mpnp_query_latency_seconds_count 5.0" in text
    assert "# TYPE mpnp_request_queue_depth gauge" in text


def test_status_latency_quantiles_are_measured(live):
    daemon, client = live
    latency = client.status()["latency"]
    recent = daemon.metrics.query_latency.recent()
    assert latency["count"] == len(recent) == latency["window"] >= 5
    assert latency["p50_s"] in recent and latency["p99_s"] == max(recent)  # samples, not bounds


def test_healthz_liveness_and_readiness(live):
    daemon, _ = live
    status, content_type, body = _get(*daemon.metrics_address, "/healthz")
    state = json.loads(body)
    assert status == 200 and content_type == "application/json"
    assert state["live"] and state["ready"] and state["state"] == "serving"
    assert all(state["threads"].values()) and state["engine_step_age_s"] < 5
    assert _get(*daemon.metrics_address, "/healthz/ready")[0] == 200
    # an engine loop that stopped stepping is not live (the heartbeat is from long ago)
    old = daemon.LIVENESS_S
    daemon.LIVENESS_S = 0.0
    try:
        status, _, body = _get(*daemon.metrics_address, "/healthz/live")
    finally:
        daemon.LIVENESS_S = old
    assert status == 503 and json.loads(body)["live"] is False
    assert _get(*daemon.metrics_address, "/nothing")[0] == 404


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    import argparse

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["client", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_client_flags_after_the_action_and_human_output(live, capsys):
    daemon, _ = live
    endpoint = daemon.endpoints["query"]
    code, out, _ = _cli(capsys, "status", "--json", "--endpoint", endpoint)
    assert code == 0 and json.loads(out)["serving"]["modalities"] == ["camera"]
    code, out, _ = _cli(capsys, "--endpoint", endpoint, "status", "--timeout", "3")
    assert code == 0 and out.startswith("mPnP daemon, protocol 1")
    assert "serving     camera (state generation 1)" in out and "p99" in out
    code, out, _ = _cli(capsys, "store", "--endpoint", endpoint)
    assert code == 0 and out.startswith("store ") and "state-00000001" in out
    code, out, _ = _cli(capsys, "store", "--endpoint", endpoint, "--json")
    assert json.loads(out)["entries"][0]["kind"] == "state"


def test_client_exit_codes_are_distinct(live, capsys):
    daemon, _ = live
    endpoint = daemon.endpoints["query"]
    code, _, err = _cli(capsys, "power-mode", "MODE_9W", "--endpoint", endpoint)
    assert code == EXIT_DAEMON_ERROR == 1 and "power_error" in err
    code, _, err = _cli(capsys, "ping", "--endpoint", "tcp://127.0.0.1:1", "--timeout", "0.2")
    assert code == EXIT_TIMEOUT == 3 and "is the daemon running" in err
    code, _, err = _cli(capsys, "modality", "forced", "--endpoint", endpoint)
    assert code == EXIT_USAGE == 2 and "needs the modalities" in err
    with pytest.raises(SystemExit) as info:
        _cli(capsys, "frobnicate")
    assert info.value.code == EXIT_USAGE


def test_the_client_runs_without_torch(live):
    """``mpnp-client`` and ``daemon.client`` import and work with no model library loaded."""
    daemon, _ = live
    code = (
        "import sys\n"
        "from daemon.client import Client\n"
        "from daemon.cli import client_main\n"
        f"rc = client_main(['ping', '--endpoint', {daemon.endpoints['query']!r}])\n"
        "heavy = [m for m in ('torch', 'transformers', 'timm', 'peft', 'onnxruntime',"
        " 'safetensors') if m in sys.modules]\n"
        "assert rc == 0 and not heavy, (rc, heavy)\n"
        "print('ok')\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pong", "ok"]
    assert time.monotonic() - started < 30


def test_the_base_install_is_torch_free_and_ships_mpnp_client():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    base = cfg["options"]["install_requires"]
    assert "torch" not in base and "prometheus-client" in base and "pyzmq" in base
    assert "torch" in cfg["options.extras_require"]["model"]
    assert "mpnp-client = daemon.cli:client_main" in cfg["options.entry_points"]["console_scripts"]
    assert '".[model,dev,record]"' in (ROOT / "tools" / "dev.sh").read_text()
    assert "torch" not in cfg["options.extras_require"]["record"]
