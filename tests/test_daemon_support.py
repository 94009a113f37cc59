"""Shared helpers for the daemon tests (no tests here).

:class:`ToyBackend` is a deterministic test double of :class:`daemon.backend.ModelBackend`:
its answers spell out the question, the modality set, the serving state's version and the
frame id, so tests can see exactly which state and frame answered.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import numpy as np

from daemon.backend import AdaptProgress
from daemon.config import DaemonConfig
from mpnp.cost_model import CostModel
from scenes.sample import CAMERA_VIEWS, Frame


@contextlib.contextmanager
def alarm(seconds: float):
    """Fail (TimeoutError) instead of hanging when a test overruns."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded {seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class ToyBackend:
    def __init__(
        self,
        adapted_accuracy: float = 0.8,
        serving_accuracy: float = 0.5,
        step_delay_s: float = 0.0,
        fail_step_at: int | None = None,
        num_layers: int = 8,
        state_bytes: int = 16,
    ) -> None:
        self.adapted_accuracy = adapted_accuracy
        self.serving_accuracy = serving_accuracy
        self.step_delay_s = step_delay_s
        self.fail_step_at = fail_step_at
        self.num_layers = num_layers
        self.state_bytes = state_bytes
        self.version = 0
        self.candidate: dict | None = None
        self.calls: list[tuple] = []
        self.lock = threading.Lock()

    def answer(self, questions, frames, modalities):
        self.calls.append(("answer", len(questions)))
        return [
            f"{q}|{'+'.join(sorted(modalities))}|v{self.version}|{f.frame_id if f else None}"
            for q, f in zip(questions, frames or [None] * len(questions))
        ]

    def start_adaptation(self, modalities, n_blocks, steps, batch_size):
        self.calls.append(("start", tuple(sorted(modalities)), n_blocks, steps))
        self.candidate = {"modalities": modalities, "n": n_blocks, "steps": steps, "done": 0}

    def adaptation_step(self):
        c = self.candidate
        if c is None or c["done"] >= c["steps"]:
            return None
        if self.fail_step_at is not None and c["done"] + 1 == self.fail_step_at:
            raise RuntimeError("toy step failure")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        c["done"] += 1
        self.calls.append(("step", c["done"]))
        return AdaptProgress(c["done"], c["steps"], loss=1.0 / c["done"], samples=16 * c["done"])

    def set_total_steps(self, steps):
        self.calls.append(("total", steps))
        if self.candidate is not None:
            self.candidate["steps"] = max(steps, self.candidate["done"])

    def validation_accuracy(self, which):
        return self.adapted_accuracy if which == "adapted" else self.serving_accuracy

    def commit_adapted(self):
        self.calls.append(("commit",))
        self.version += 1
        self.candidate = None

    def discard_adapted(self):
        self.calls.append(("discard",))
        self.candidate = None

    def save_state(self, path: Path):
        from safetensors.numpy import save_file

        # The payload makes a save take long enough for a SIGKILL to land inside it.
        payload = np.full(max(self.state_bytes // 4, 1), self.version, np.float32)
        save_file({"version": np.full(4, self.version, np.int64), "payload": payload}, str(path))

    def load_state(self, path: Path):
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        version = int(tensors["version"][0])
        if not (tensors["payload"] == version).all():
            raise ValueError(f"{path}: payload does not match version {version}")
        self.version = version
        self.calls.append(("load", self.version))

    def cost_model(self):
        return CostModel(forward=1e6, dy_llm=2e6, dw_aligners=1e4, dy_emb=1e4,
                         num_layers=self.num_layers)


def make_toy_backend(**options) -> ToyBackend:
    return ToyBackend(**options)


def toy_frame(frame_id: str = "f0", timestamp: float = 0.0, light: float = 1.0,
              size: tuple[int, int] = (8, 12), points: int = 16) -> Frame:
    h, w = size
    level = int(round(light * 200))
    cameras = {view: np.full((h, w, 3), level, np.uint8) for view in CAMERA_VIEWS}
    lidar = np.arange(points * 4, dtype=np.float32).reshape(points, 4)
    return Frame(frame_id, "toy", timestamp, light, cameras, lidar)


def test_config(tmp_path: Path, **sections) -> DaemonConfig:
    """A fast config: random loopback ports, store in tmp_path, simulated Orin."""
    data = {
        "endpoints": {"ingest": "tcp://127.0.0.1:*", "query": "tcp://127.0.0.1:*",
                      "events": "tcp://127.0.0.1:*", "metrics": "127.0.0.1:0"},
        "store": {"path": str(tmp_path / "store")},
        "power": {"monitor": "sim-orin", "options": {"switch_delay_s": 0.0},
                  "poll_interval_s": 0.05},
        "policy": {"name": "light-level", "options": {"dwell_s": 0.0}},
        "adaptation": {"target_steps": 20, "min_steps": 2, "deadline_s": 60,
                       "progress_every": 5, "batch_size": 4},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return DaemonConfig.from_dict(data)


test_config.__test__ = False  # not a test despite its name


@contextlib.contextmanager
def running_daemon(config: DaemonConfig, backend=None, monitor=None, notifier=None):
    """Run a :class:`daemon.server.Daemon` in a thread; stop and join on exit."""
    from daemon.server import Daemon

    daemon = Daemon(config, backend or ToyBackend(), monitor=monitor, notifier=notifier)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run()), daemon=True)
    thread.start()
    if not daemon.ready.wait(10):
        daemon.stop()
        raise RuntimeError("daemon did not become ready")
    try:
        yield daemon
    finally:
        daemon.stop()
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError("daemon did not stop")


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Poll ``predicate`` until truthy (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
