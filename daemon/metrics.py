"""Counters, gauges and a latency histogram, rendered as Prometheus text (stdlib only).

The :class:`MetricsServer` is a tiny HTTP server on loopback serving ``GET /metrics``; it runs
in its own thread and only reads the (thread-safe) metrics.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in labels)
    return "{" + inner + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count, optionally per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

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

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        lines = self.header()
        lines += [f"{self.name}{_labels(k)} {v:g}" for k, v in items] or [f"{self.name} 0"]
        return lines


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] = float(value)


#: Recent latency samples kept for the measured quantiles in ``status``.
LATENCY_WINDOW = 2048


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank ``q`` quantile of ``values`` (``None`` when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Histogram(_Metric):
    """Bucket counts for Prometheus plus a bounded window of recent samples.

    The quantiles in :meth:`summary` are measured from the window, not bucket bounds: a
    bucket bound says nothing above the largest one (it was ``inf``, which is not JSON)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS_S,
                 window: int = LATENCY_WINDOW):
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self._sum = 0.0
        self._count = 0
        self._window: collections.deque[float] = collections.deque(maxlen=window)

    def observe(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            return  # a clock glitch must not poison the sums (or status JSON)
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value
            self._count += 1
            self._window.append(value)

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

    def render(self) -> list[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        lines = self.header()
        cumulative = 0
        for bound, n in zip((*self.buckets, math.inf), counts):
            cumulative += n
            le = "+Inf" if math.isinf(bound) else f"{bound:g}"
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum {total:g}", f"{self.name}_count {count}"]
        return lines


class DaemonMetrics:
    """Every metric the daemon exports."""

    def __init__(self) -> None:
        self.frames_in = Counter("mpnp_frames_received_total", "Sensor messages accepted.")
        self.frames_dropped = Counter("mpnp_frames_dropped_total", "Sensor messages dropped.")
        self.clock_resets = Counter("mpnp_sensor_clock_resets_total",
                                    "Sensor clocks re-anchored after limits.clock_reset_frames "
                                    "frames behind the newest.")
        self.queries = Counter("mpnp_queries_total", "Questions answered.")
        self.requests = Counter("mpnp_requests_total", "Requests received, by type.")
        self.errors = Counter("mpnp_errors_total", "Error replies, by code.")
        self.query_latency = Histogram("mpnp_query_latency_seconds", "Question latency.")
        self.adaptation_progress = Gauge("mpnp_adaptation_progress", "Steps done / planned.")
        self.adaptation_active = Gauge("mpnp_adaptation_active", "1 while adapting.")
        self.adaptations = Counter("mpnp_adaptations_total", "Finished adaptations, by result.")
        self.power_watts = Gauge("mpnp_power_watts", "Measured power draw.")
        self.gpu_mhz = Gauge("mpnp_gpu_frequency_mhz", "Current GPU clock.")
        self.uptime = Gauge("mpnp_uptime_seconds", "Seconds since start.")

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.all():
            lines += metric.render()
        return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on a loopback port, served from a daemon thread."""

    def __init__(self, metrics: DaemonMetrics, host: str, port: int) -> None:
        render = metrics.render

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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
