"""Counters, gauges and a latency histogram: Prometheus text through ``prometheus-client``
(its escaping, its process collectors), plus plain values and a window of recent latencies
for ``status``.

The :class:`MetricsServer` is a tiny HTTP server on loopback serving ``GET /metrics`` and
``GET /healthz``; it runs in its own thread and only reads the (thread-safe) metrics.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry

prometheus_client.disable_created_metrics()  # no *_created series: nothing scrapes them

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Metric:
    """One daemon metric: a ``prometheus_client`` metric in the daemon's own registry (what
    ``/metrics`` serves, escaped by the library) plus the plain values ``status`` reads."""

    kind = ""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labels)
        self._lock = threading.Lock()
        self._registry = registry
        self._prom: Any = None

    def _child(self, labels: dict[str, str]) -> Any:
        if self._prom is None:
            return None
        if self.labelnames:
            return self._prom.labels(**{k: str(labels.get(k, "")) for k in self.labelnames})
        return self._prom


class Counter(_Metric):
    """A monotonically increasing count, optionally per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 registry: CollectorRegistry | None = None) -> None:
        super().__init__(name, help_text, labels, registry)
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        if registry is not None:
            self._prom = self._make(registry)

    def _make(self, registry: CollectorRegistry) -> Any:
        return prometheus_client.Counter(self.name, self.help, self.labelnames,
                                         registry=registry)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount
        child = self._child(labels)
        if child is not None:
            child.inc(amount)

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(sorted(labels.items())), 0.0)

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())

    def by_label(self, label: str) -> dict[str, float]:
        with self._lock:
            items = list(self._values.items())
        return {dict(k).get(label, ""): v for k, v in items}


class Gauge(Counter):
    kind = "gauge"

    def _make(self, registry: CollectorRegistry) -> Any:
        return prometheus_client.Gauge(self.name, self.help, self.labelnames, registry=registry)

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] = float(value)
        child = self._child(labels)
        if child is not None:
            child.set(float(value))


#: Recent latency samples kept for the measured quantiles in ``status``.
LATENCY_WINDOW = 2048


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank ``q`` quantile of ``values`` (``None`` when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Histogram(_Metric):
    """Buckets for Prometheus (in the registry) plus a bounded window of recent samples.

    The quantiles in :meth:`summary` are measured from the window, not bucket bounds: a
    bucket bound says nothing above the largest one (it was ``inf``, which is not JSON)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS_S,
                 window: int = LATENCY_WINDOW, registry: CollectorRegistry | None = None):
        super().__init__(name, help_text, (), registry)
        self.buckets = tuple(sorted(buckets))
        if registry is not None:
            self._prom = prometheus_client.Histogram(name, help_text, buckets=self.buckets,
                                                     registry=registry)
        self._sum = 0.0
        self._count = 0
        self._window: collections.deque[float] = collections.deque(maxlen=window)

    def observe(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            return  # a clock glitch must not poison the sums (or status JSON)
        with self._lock:
            self._sum += value
            self._count += 1
            self._window.append(value)
        if self._prom is not None:
            self._prom.observe(value)

    def recent(self) -> list[float]:
        with self._lock:
            return list(self._window)

    def summary(self) -> dict[str, float | int | None]:
        with self._lock:
            count, total, recent = self._count, self._sum, list(self._window)
        return {
            "count": count,
            "mean_s": total / count if count else None,
            "window": len(recent),
            "p50_s": percentile(recent, 0.50),
            "p95_s": percentile(recent, 0.95),
            "p99_s": percentile(recent, 0.99),
            "max_s": max(recent) if recent else None,
        }


class DaemonMetrics:
    """Every metric the daemon exports, in its own registry (several daemons can live in one
    process, as in the tests) with the process and platform collectors."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        prometheus_client.ProcessCollector(registry=r)  # RSS, CPU, open fds (Linux)
        prometheus_client.PlatformCollector(registry=r)
        prometheus_client.GCCollector(registry=r)
        self.frames_in = Counter("mpnp_frames_received_total", "Sensor messages accepted.",
                                 ("sensor",), r)
        self.frames_dropped = Counter("mpnp_frames_dropped_total", "Sensor messages dropped.",
                                      ("reason",), r)
        self.clock_resets = Counter("mpnp_sensor_clock_resets_total",
                                    "Sensor clocks re-anchored after limits.clock_reset_frames "
                                    "frames behind the newest.", ("sensor",), r)
        self.queries = Counter("mpnp_queries_total", "Questions answered.", (), r)
        self.requests = Counter("mpnp_requests_total", "Requests received, by type.",
                                ("type",), r)
        self.errors = Counter("mpnp_errors_total", "Error replies, by code.", ("code",), r)
        self.query_latency = Histogram("mpnp_query_latency_seconds", "Question latency.",
                                       registry=r)
        self.queue_depth = Gauge("mpnp_request_queue_depth", "Requests waiting for the engine.",
                                 (), r)
        self.adaptation_progress = Gauge("mpnp_adaptation_progress", "Steps done / planned.",
                                         (), r)
        self.adaptation_active = Gauge("mpnp_adaptation_active", "1 while adapting.", (), r)
        self.adaptations = Counter("mpnp_adaptations_total", "Finished adaptations, by result.",
                                   ("outcome",), r)
        self.compositions = Counter("mpnp_compositions_total",
                                    "Finished compositions (training-free), by result.",
                                    ("outcome",), r)
        self.power_watts = Gauge("mpnp_power_watts", "Measured power draw.", (), r)
        self.gpu_mhz = Gauge("mpnp_gpu_frequency_mhz", "Current GPU clock.", (), r)
        self.uptime = Gauge("mpnp_uptime_seconds", "Seconds since start.", (), r)

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        """The Prometheus text exposition of the registry."""
        return prometheus_client.generate_latest(self.registry).decode()


Health = Callable[[], dict[str, Any]]


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` on a loopback port, served from a daemon thread.

    ``/healthz`` answers the ``health()`` callback's JSON (``live``, ``ready``, ...) with 200
    when live and ready, else 503; ``/healthz/live`` and ``/healthz/ready`` check one each
    (systemd/k8s-style liveness and readiness probes)."""

    def __init__(self, metrics: DaemonMetrics, host: str, port: int,
                 health: Health | None = None) -> None:
        render = metrics.render
        check = health or (lambda: {"live": True, "ready": True})

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?")[0].rstrip("/")
                if path == "/metrics":
                    self._send(200, render().encode(), prometheus_client.CONTENT_TYPE_LATEST)
                    return
                if path in ("/healthz", "/healthz/live", "/healthz/ready"):
                    try:
                        state = check()
                    except Exception as exc:  # a failing check is unhealthy, not a crash
                        state = {"live": False, "ready": False, "error": repr(exc)}
                    wanted = {"/healthz": ("live", "ready"), "/healthz/live": ("live",),
                              "/healthz/ready": ("ready",)}[path]
                    ok = all(state.get(k) for k in wanted)
                    self._send(200 if ok else 503, json.dumps(state, default=str).encode(),
                               "application/json")
                    return
                self.send_error(404, "served: /metrics, /healthz, /healthz/live, /healthz/ready")

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("metrics http: " + fmt, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
            name="mpnp-metrics", daemon=True,
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)
