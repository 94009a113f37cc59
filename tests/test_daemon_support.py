"""Shared helpers for the daemon tests (no tests here).

:class:`ToyBackend` (in :mod:`daemon.testing`, shared with the reliability benchmark) is a
deterministic test double of :class:`daemon.backend.ModelBackend`: its answers spell out the
question, the modality set, the serving state's version and the frame id, so tests can see
exactly which state and frame answered.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

from daemon.config import DaemonConfig
from daemon.testing import ToyBackend, make_toy_backend, toy_frame  # noqa: F401 (re-exported)


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
