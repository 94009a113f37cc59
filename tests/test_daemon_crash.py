"""Crash safety: SIGKILL at random moments never corrupts the store or loses a saved state.

Two levels: the store alone (a child process saving states in a tight loop, killed at random
times), and the whole daemon (killed at random moments while operator-started adaptations
commit and save real states; restarted each time, it must resume with the last saved state).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from safetensors.numpy import load_file
from test_daemon_support import toy_frame, wait_for

from daemon.client import Client, DaemonError, DaemonTimeout, SensorPublisher
from daemon.store import TEMP_PREFIX, ModelStore

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def _check_store(root: Path, saved: list[int]) -> ModelStore:
    """Open (which recovers), verify every entry, check every saved generation survived."""
    store = ModelStore(root, keep_states=None)
    states = store.states()
    for entry in store.entries():
        store.verify(entry.name)  # raises on a missing or corrupt file
    generations = {e.generation for e in states}
    missing = [g for g in saved if g not in generations]
    assert not missing, f"saved generations lost after SIGKILL: {missing}"
    leftovers = [p for p in root.rglob(f"{TEMP_PREFIX}*")]
    assert not leftovers, f"temp files left after recovery: {leftovers}"
    named = {e.file for e in store.entries()}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")}
    assert on_disk == named, f"orphan files: {sorted(on_disk - named)}"
    return store


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from daemon.store import ModelStore
    store = ModelStore(sys.argv[1], keep_states=None)
    from safetensors.numpy import save_file
    while True:
        payload = np.random.default_rng().random(1_000_000, dtype=np.float32)
        entry = store.save_state(lambda p: save_file({"w": payload}, str(p)),
                                 {"modalities": ["camera"]})
        print(entry.generation, flush=True)
""")


def test_store_survives_sigkill_at_random_moments(tmp_path):
    root = tmp_path / "store"
    rng = random.Random(1234)
    saved: list[int] = []
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], env=ENV,
                                 stdout=subprocess.PIPE, text=True)
        first = child.stdout.readline()  # the child has started writing
        assert first.strip().isdigit(), first
        saved.append(int(first))
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=10)
        saved += [int(line) for line in out.split()]
        store = _check_store(root, saved)
        store.close()
    assert len(saved) >= 8


def _daemon_config(tmp_path: Path) -> Path:
    ipc = tmp_path / "s"
    ipc.mkdir(exist_ok=True)
    config = {
        "endpoints": {"ingest": f"ipc://{ipc}/ingest", "query": f"ipc://{ipc}/query",
                      "events": f"ipc://{ipc}/events", "metrics": ""},
        "model": {"backend": "test_daemon_support:make_toy_backend",
                  "options": {"state_bytes": 8_000_000, "step_delay_s": 0.01}},
        "store": {"path": str(tmp_path / "store"), "keep_states": 1000},
        "policy": {"name": "fixed", "options": {"modalities": ["camera"]}},
        "power": {"monitor": "sim-orin", "options": {"switch_delay_s": 0.0},
                  "poll_interval_s": 0.1},
        "adaptation": {"auto": False, "target_steps": 4, "min_steps": 1, "deadline_s": 60,
                       "batch_size": 1},
    }
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps(config))
    return path


def _start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config)], env=ENV,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_ready(client: Client, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            return client.status()
        except DaemonTimeout:
            continue
    raise AssertionError("daemon did not come up")


def test_daemon_sigkill_during_adaptation_resumes_last_saved_state(tmp_path):
    config = _daemon_config(tmp_path)
    ipc = tmp_path / "s"
    rng = random.Random(99)
    saved: list[int] = []
    for round_ in range(4):
        proc = _start(config)
        try:
            with Client(f"ipc://{ipc}/query", timeout_s=5) as client:
                status = _wait_ready(client, proc)
                # Resumed with the newest state saved before the last kill (1: the initial
                # state, saved at the first start).
                assert status["serving"]["generation"] == (max(saved) if saved else 1)
                if saved:
                    _assert_answers_with_store_state(client, ipc, tmp_path / "store", status)
                kill_at = time.monotonic() + rng.uniform(0.3, 1.2)
                mods = ["camera"]
                while time.monotonic() < kill_at:
                    try:
                        client.adapt("start", mods, force_commit=True)
                        mods = ["lidar"] if mods == ["camera"] else ["camera"]
                    except DaemonError as exc:
                        assert exc.code == "conflict"  # the previous run is still going
                    status = client.status()
                    generation = status["serving"]["generation"]
                    if generation is not None and generation not in saved:
                        saved.append(generation)  # status shows only saved generations
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        _check_store(tmp_path / "store", saved).close()
    assert len(saved) >= 4, f"too few adaptations committed to test anything: {saved}"


def _assert_answers_with_store_state(client, ipc, store_root, status) -> None:
    store = ModelStore(store_root, keep_states=None, lock=False)
    entry = store.get(f"state-{status['serving']['generation']:08d}")
    version = int(load_file(str(store.path(entry)))["version"][0])
    with SensorPublisher(f"ipc://{ipc}/ingest") as publisher:
        frame = toy_frame("after-restart", timestamp=time.time())

        def answered():
            publisher.send_camera(frame)
            publisher.send_lidar(frame)
            try:
                return client.ask("q", "after-restart")
            except (DaemonError, DaemonTimeout):
                return None

        reply = wait_for(answered, timeout=10, interval=0.05)
    assert reply["answer"].split("|")[2] == f"v{version}"
    assert reply["modalities"] == entry.meta["modalities"]
