"""``mpnp bench reliability``: the daemon's reliability suites, full-sized (issue 12).

- **query fuzz** (default 10,000 requests): generated requests across the categories
  structure, types, sizes, encodings, nesting, numbers, versions, commands and extreme
  values, sent lock-step through a real DEALER socket to an in-process daemon on the fake
  backend (:mod:`daemon.testing`). Pass: 0 crashes (the daemon thread and both IO threads
  alive, a separate client's ``ping`` answered every 500 requests), every request answered,
  memory flat (RSS growth after warm-up under 5 %).
- **ingest fuzz** (default 10,000 messages): malformed sensor messages, each built to hit one
  documented drop reason, mixed with valid ones, through a real PUSH socket. Pass: 0
  crashes, every message accounted for (accepted, or dropped under exactly the expected
  reason: the per-reason counts must match the plan), valid frames accepted afterwards.
- **kill** (``--kill``, default 20 kills): the daemon in its own process (real ``mpnp``
  backend by default), operator-started adaptations with ``force_commit``, SIGKILL at
  random moments; after each: every store entry verifies, the restart succeeds and serves
  the newest committed state.
- **soak** (``--soak --minutes M``, default 30): the rig rate (6 cameras at 12 Hz as one
  camera message, LiDAR at 20 Hz), a question per second, adaptations back to back, real
  backend. Pass: RSS growth < 5 %, >= 99 % of frames accepted; p50/p99 latency reported.

``--backend fake`` runs kill and soak on the fake backend (seconds; what the tests do).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"rss_growth": 0.05, "frames_accepted_1x": 0.99}
QUERY_CATEGORIES = ("structure", "types", "sizes", "encodings", "nesting", "numbers",
                    "versions", "commands", "extreme")
#: Limits of the fuzz daemon (small, so that the sizes category reaches them cheaply).
FUZZ_LIMITS = {"max_request_bytes": 8192, "max_header_bytes": 2048,
               "max_frame_bytes": 256 * 1024, "max_question_chars": 500,
               "max_question_bytes": 1000, "max_image_side": 64, "max_lidar_points": 100_000}
TOY_CAMERA = (8, 12)
WORLD_CAMERA = (64, 112)  # the synthetic world's views, the shipped camera encoder's input


def add_bench_command(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "reliability", help="fuzz (queries, ingest), SIGKILL and soak suites of the daemon")
    p.add_argument("--query-fuzz", type=int, default=10_000, help="generated requests")
    p.add_argument("--ingest-fuzz", type=int, default=10_000, help="generated sensor messages")
    p.add_argument("--no-fuzz", action="store_true", help="skip both fuzz suites")
    p.add_argument("--kill", action="store_true", help="run the SIGKILL suite")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs in the kill suite")
    p.add_argument("--soak", action="store_true", help="run the soak suite")
    p.add_argument("--minutes", type=float, default=30.0, help="soak duration")
    p.add_argument("--backend", choices=["mpnp", "fake"], default="mpnp",
                   help="backend of the kill and soak suites (fake: seconds, for tests)")
    p.add_argument("--model-store", default="", help="model store (default $MPNP_HOME)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the real backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result JSON here")
    p.add_argument("--markdown", type=Path, help="write the Markdown report here")
    p.set_defaults(func=_run)


# --- shared ---------------------------------------------------------------------------------

def _rss_mb(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def _percentile(values: list[float], q: float) -> float | None:
    from daemon.metrics import percentile

    return percentile(values, q)


def _latency(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "p50_s": _percentile(values, 0.5),
            "p99_s": _percentile(values, 0.99), "max_s": max(values) if values else None,
            "mean_s": statistics.fmean(values) if values else None}


def _fuzz_config(tmp: Path):
    from daemon.config import DaemonConfig

    return DaemonConfig.from_dict({
        "endpoints": {"ingest": "tcp://127.0.0.1:*", "query": "tcp://127.0.0.1:*",
                      "events": "tcp://127.0.0.1:*", "metrics": ""},
        "store": {"path": str(tmp / "store")},
        "power": {"monitor": "sim-orin", "options": {"switch_delay_s": 0.0},
                  "poll_interval_s": 0.05},
        "policy": {"name": "light-level", "options": {"dwell_s": 0.0}},
        "adaptation": {"target_steps": 5, "min_steps": 1, "deadline_s": 60, "batch_size": 1},
        "limits": FUZZ_LIMITS,
    })


class _InProcessDaemon:
    """A :class:`daemon.server.Daemon` on the fake backend in a thread."""

    def __init__(self, tmp: Path) -> None:
        from daemon.server import Daemon
        from daemon.testing import ToyBackend

        self.backend = ToyBackend(camera_shape=TOY_CAMERA)
        self.daemon = Daemon(_fuzz_config(tmp), self.backend)
        self.exit: list[int] = []
        self.thread = threading.Thread(target=lambda: self.exit.append(self.daemon.run()),
                                       name="fuzz-daemon", daemon=True)

    def __enter__(self):
        self.thread.start()
        if not self.daemon.ready.wait(30):
            raise RuntimeError("the fuzz daemon did not become ready")
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop()
        self.thread.join(30)

    def crashed(self) -> str | None:
        if self.daemon._io_errors:
            return f"IO thread died: {self.daemon._io_errors[0]!r}"
        if not self.thread.is_alive():
            return f"daemon exited with {self.exit}"
        dead = [t.name for t in self.daemon._threads if not t.is_alive()]
        return f"threads dead: {dead}" if dead else None


# --- query fuzz -----------------------------------------------------------------------------

TAG = b"MPNP/1"
TYPES = ("query", "status", "set_power_mode", "set_modality", "adapt", "list_store", "ping")


class QueryFuzzer:
    """Generates ``(category, frames)`` requests (frames after the DEALER's empty frame)."""

    def __init__(self, rng: random.Random, limits: dict[str, int]) -> None:
        self.rng = rng
        self.limits = limits
        self.count = 0

    def _id(self) -> str:
        self.count += 1
        return f"fz{self.count}"

    def _body(self, **fields: Any) -> bytes:
        return json.dumps({"id": self._id(), **fields}).encode()

    def _value(self, depth: int = 0) -> Any:
        r = self.rng
        choice = r.randrange(9 if depth < 3 else 6)
        if choice == 0:
            return None
        if choice == 1:
            return r.choice([True, False])
        if choice == 2:
            return r.randint(-2**70, 2**70)
        if choice == 3:
            return r.uniform(-1e300, 1e300)
        if choice == 4:
            return "".join(chr(r.randrange(32, 0x2FFF)) for _ in range(r.randrange(12)))
        if choice == 5:
            return r.choice(["camera", "lidar", "auto", "forced", "start", "stop", "commit",
                             "MAXN", "MODE_30W", ""])
        if choice == 6:
            return [self._value(depth + 1) for _ in range(r.randrange(4))]
        return {str(self._value(depth + 1))[:8]: self._value(depth + 1)
                for _ in range(r.randrange(4))}

    def structure(self) -> list[bytes]:
        r = self.rng
        kind = r.randrange(6)
        if kind == 0:
            return [r.randbytes(r.randrange(0, 64)) for _ in range(r.choice([1, 2, 4, 5, 9]))]
        if kind == 1:
            return [TAG, r.choice(TYPES).encode()]
        if kind == 2:
            return [TAG, r.choice(TYPES).encode(), self._body(), b"extra"]
        if kind == 3:
            return [TAG, b"", b""]
        if kind == 4:
            return [TAG, r.choice(TYPES).encode(), json.dumps(self._value()).encode()]
        return [r.choice(TYPES).encode(), TAG, self._body()]

    def types(self) -> list[bytes]:
        r = self.rng
        kind = r.choice(TYPES)
        body: dict[str, Any] = {"id": self._value() if r.random() < 0.4 else self._id()}
        for name in r.sample(["question", "frame_id", "mode", "modalities", "action",
                              "force_commit"], r.randrange(1, 4)):
            body[name] = self._value()
        return [TAG, kind.encode(), json.dumps(body, default=str).encode()]

    def sizes(self) -> list[bytes]:
        r = self.rng
        lim = self.limits
        kind = r.randrange(5)
        if kind == 0:  # bodies around the byte limit (all under the transport cap)
            n = lim["max_request_bytes"] + r.randint(-64, lim["max_request_bytes"])
            return [TAG, b"query", self._body(question="q" * max(n, 1))]
        if kind == 1:
            n = lim["max_question_chars"] + r.randint(-2, 2)
            return [TAG, b"query", self._body(question="x" * n)]
        if kind == 2:
            n = lim["max_question_bytes"] // 4 + r.randint(-2, 2)
            raw = json.dumps({"id": self._id(), "question": "\U0001F697" * n},
                             ensure_ascii=False)
            return [TAG, b"query", raw.encode()]
        if kind == 3:
            return [TAG, b"ping", json.dumps({"id": "i" * r.choice([0, 1, 128, 129, 4000])}
                                             ).encode()]
        return [TAG, b"set_modality", self._body(mode="forced",
                                                 modalities=["camera"] * r.randrange(1500))]

    def encodings(self) -> list[bytes]:
        r = self.rng
        text = json.dumps({"id": self._id(), "question": "is there a car?"})
        kind = r.randrange(7)
        if kind == 0:
            raw = text.encode("utf-16")
        elif kind == 1:
            raw = b"\xef\xbb\xbf" + text.encode()
        elif kind == 2:
            raw = text.encode().replace(b"car", b"c\xff\xfer")
        elif kind == 3:
            raw = text.replace("car", "\\ud800").encode()
        elif kind == 4:
            raw = text.replace("car", "\\u0000\x00").encode()
        elif kind == 5:
            raw = text.encode().replace(b"car", b"\xc0\xafr")  # overlong UTF-8
        else:
            raw = text.encode("latin-1") + bytes([r.randrange(128, 256)])
        return [TAG, r.choice([b"query", b"ping", b"\xff\xfe"]), raw]

    def nesting(self) -> list[bytes]:
        r = self.rng
        depth = r.choice([2, 8, 31, 32, 33, 100, 1000, 2000])
        opener, closer = r.choice([(b"[", b"]"), (b'{"a":', b"}")])
        nested = opener * depth + b"1" + closer * depth
        where = r.randrange(3)
        if where == 0:
            raw = b'{"id":"' + self._id().encode() + b'","question":' + nested + b"}"
        elif where == 1:
            raw = nested
        else:
            raw = b'{"id":"' + self._id().encode() + b'","x":' + nested + b"}"
        return [TAG, r.choice(TYPES).encode(), raw]

    def numbers(self) -> list[bytes]:
        r = self.rng
        literal = r.choice([
            b"1" * r.choice([20, 64, 65, 400, 5000, 8000]), b"-" + b"9" * 5000, b"1e999",
            b"-1e999", b"1e-400", b"NaN", b"Infinity", b"-Infinity", b"-0", b"0.0000000001",
            b"1." + b"5" * 300, b"123456789012345678901234567890e10",
        ])
        name = r.choice([b"id", b"question", b"mode", b"force_commit", b"frame_id"])
        kind = r.choice([b"query", b"set_power_mode", b"adapt", b"ping"])
        head = b'{"id":"' + self._id().encode() + b'",' if name != b"id" else b"{"
        return [TAG, kind, head + b'"' + name + b'":' + literal + b"}"]

    def versions(self) -> list[bytes]:
        r = self.rng
        tag = r.choice([b"MPNP/0", b"MPNP/2", b"mpnp/1", b"", b"MPNP/1\x00", b"MPNP/1 ",
                        b"MPNP/1.0", b"HTTP/1.1", r.randbytes(8)])
        return [tag, b"ping", self._body()]

    def commands(self) -> list[bytes]:
        r = self.rng
        kind = r.randrange(8)
        if kind == 0:
            name = r.choice([b"self_destruct", b"QUERY", b"query ", b"", b"\x00", b"exec",
                             r.randbytes(6)])
            return [TAG, name, self._body()]
        if kind == 1:
            return [TAG, b"query", self._body(question=r.choice(
                ["how many cars?", "is there a truck?", "what is in front?"]))]
        if kind == 2:
            return [TAG, r.choice([b"ping", b"status", b"list_store"]), self._body()]
        if kind == 3:
            return [TAG, b"set_modality", self._body(
                mode=r.choice(["auto", "forced", "sometimes"]),
                modalities=r.choice([["camera"], ["lidar"], ["camera", "lidar"], [], ["sonar"],
                                     "camera"]))]
        if kind == 4:
            return [TAG, b"adapt", self._body(action=r.choice(["start", "stop", "commit",
                                                               "explode"]))]
        if kind == 5:
            return [TAG, b"set_power_mode", self._body(mode=r.choice(
                ["MAXN", "MODE_30W", "MODE_15W", "MODE_1000W", "", "0", "x" * 100]))]
        if kind == 6:
            return [TAG, b"query", self._body(question="q", frame_id=r.choice(
                ["nope", "x" * 128, "f"]))]
        return [TAG, r.choice(TYPES).encode(), self._body(unexpected=self._value())]

    def extreme(self) -> list[bytes]:
        r = self.rng
        kind = r.randrange(6)
        if kind == 0:
            return [TAG, b"query", self._body(question=" \t\n" * r.randrange(1, 50))]
        if kind == 1:
            return [TAG, b"query", self._body(question="".join(
                chr(r.randrange(0, 32)) for _ in range(40)))]
        if kind == 2:
            return [TAG, b"query", self._body(question="q", frame_id="x" * 129)]
        if kind == 3:
            return [TAG, b"adapt", self._body(action="start", modalities=["camera"] * 50,
                                              force_commit=r.choice([True, 1, "yes", None]))]
        if kind == 4:
            return [TAG, b"status", b'{"id":"' + self._id().encode() + b'"' + b" " * 4000 + b"}"]
        return [TAG, b"query", json.dumps({"id": self._id(), "question": "q",
                                           "question ": "dup", "frame_id": None}).encode()]

    def generate(self, n: int) -> Iterator[tuple[str, list[bytes]]]:
        for i in range(n):
            category = QUERY_CATEGORIES[i % len(QUERY_CATEGORIES)]
            yield category, getattr(self, category)()


def run_query_fuzz(n: int, seed: int = 0, tmp: Path | None = None) -> dict[str, Any]:
    import zmq

    from daemon.client import Client, DaemonTimeout, SensorPublisher
    from daemon.testing import toy_frame

    tmp = tmp or Path(tempfile.mkdtemp(prefix="mpnp-fuzz-query-"))
    fuzzer = QueryFuzzer(random.Random(seed), FUZZ_LIMITS)
    replies: dict[str, Counter] = {c: Counter() for c in QUERY_CATEGORIES}
    unanswered: dict[str, int] = Counter()
    crashes: list[str] = []
    rss: list[tuple[int, float]] = []
    started = time.monotonic()
    with _InProcessDaemon(tmp) as live:
        daemon = live.daemon
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(daemon.endpoints["query"])
        with Client(daemon.endpoints["query"], timeout_s=10, context=ctx) as probe, \
                SensorPublisher(daemon.endpoints["ingest"], context=ctx) as publisher:
            frame = toy_frame("fz-frame", timestamp=time.time(), size=TOY_CAMERA)
            publisher.send_camera(frame)
            publisher.send_lidar(frame)
            for i, (category, frames) in enumerate(fuzzer.generate(n)):
                sock.send_multipart([b"", *frames])
                if sock.poll(10_000):
                    parts = sock.recv_multipart()
                    code = "?"
                    if len(parts) == 4 and parts[1] == TAG:
                        code = "ok" if parts[2] == b"ok" else json.loads(parts[3]).get("code", "?")
                    replies[category][code] += 1
                else:
                    unanswered[category] += 1
                if (i + 1) % 500 == 0:
                    problem = live.crashed()
                    try:
                        probe.ping()
                    except DaemonTimeout:
                        problem = problem or "ping unanswered"
                    if problem:
                        crashes.append(f"after {i + 1}: {problem}")
                        break
                if (i + 1) % 1000 == 0:
                    rss.append((i + 1, _rss_mb()))
            final = live.crashed()
            if final:
                crashes.append(f"at the end: {final}")
            status = probe.status()
        sock.close()
        ctx.term()
    baseline = rss[0][1] if rss else None
    growth = (rss[-1][1] - baseline) / baseline if rss and baseline else None
    answered = sum(sum(c.values()) for c in replies.values())
    return {
        "requests": n, "answered": answered, "unanswered": dict(unanswered),
        "crashes": crashes, "replies_by_category": {k: dict(v) for k, v in replies.items()},
        "rss_mb": rss, "rss_growth_after_warmup": growth,
        "daemon_errors": status["counters"]["errors"], "seconds": time.monotonic() - started,
        "passed": not crashes and not unanswered and answered == n
        and (growth is None or growth < TARGETS["rss_growth"]),
    }


# --- ingest fuzz ----------------------------------------------------------------------------

class IngestFuzzer:
    """Sensor messages with the drop reason each must get (``None``: accepted)."""

    def __init__(self, rng: random.Random, limits: dict[str, int]) -> None:
        import numpy as np

        from scenes.sample import CAMERA_VIEWS, LIDAR

        self.np = np
        self.rng = rng
        self.limits = limits
        self.views = CAMERA_VIEWS
        self.lidar_name = LIDAR
        self.clock = {"camera": 1000.0, "lidar": 1000.0}  # newest valid timestamp per sensor
        self.accepted = {"camera": 0, "lidar": 0}
        self.index = 0
        self._force_valid: str | None = None

    def _valid(self, sensor: str, stale: bool = False) -> tuple[dict, list[bytes]]:
        np = self.np
        self.index += 1
        if stale:
            timestamp = self.clock[sensor] - self.rng.uniform(0.01, 0.5)
        else:
            self.clock[sensor] += 0.05
            timestamp = self.clock[sensor]
        if sensor == "camera":
            h, w = TOY_CAMERA
            level = self.index % 256
            arrays = {v: np.full((h, w, 3), level, np.uint8) for v in self.views}
        else:
            arrays = {self.lidar_name: np.full((16, 4), self.index % 7, np.float32)}
        specs = [{"name": k, "dtype": a.dtype.str, "shape": list(a.shape)}
                 for k, a in arrays.items()]
        header = {"v": 1, "sensor": sensor, "frame_id": f"g{self.index}",
                  "timestamp": timestamp, "buffers": specs}
        return header, [a.tobytes() for a in arrays.values()]

    @staticmethod
    def _dump(header: dict) -> bytes:
        return json.dumps(header).encode()

    def malformed(self) -> tuple[str, list[bytes]]:
        """One malformed message and the reason it must be dropped under."""
        r, np = self.rng, self.np
        sensor = r.choice(["camera", "lidar"])
        header, buffers = self._valid(sensor)
        self.clock[sensor] -= 0.05  # a dropped message does not advance the clock
        kind = r.randrange(26)
        dump = self._dump
        if kind == 0:
            return "bad_header", [r.randbytes(r.randrange(1, 100)) + b"{", *buffers]
        if kind == 1:
            return "bad_header", [json.dumps([header]).encode(), *buffers]
        if kind == 2:
            del header[r.choice(["frame_id", "timestamp", "buffers"])]
            return "bad_header", [dump(header), *buffers]
        if kind == 3:
            name = r.choice(["frame_id", "timestamp", "buffers", "ambient_light"])
            header[name] = r.choice({"frame_id": [5, [], None, "", "f" * 129],
                                     "timestamp": ["x", [], {}, True, None],
                                     "buffers": ["x", {}, 5, None],
                                     "ambient_light": ["x", [], True, {}]}[name])
            return "bad_header", [dump(header), *buffers]
        if kind == 4:  # nested past the depth limit, the header still under its byte limit
            depth = r.choice([33, 100, 500])
            raw = dump(header)[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}"
            return "bad_header", [raw, *buffers]
        if kind == 5:  # an integer literal too long (and far too big for a float)
            raw = dump(header)
            cut = raw.index(b'"timestamp": ') + len(b'"timestamp": ')
            end = raw.index(b",", cut)
            raw = raw[:cut] + b"9" * r.choice([65, 400, 1000]) + raw[end:]
            return "bad_header", [raw, *buffers]
        if kind == 6:
            header["buffers"][0] = r.choice(["CAM", 5, None, []])
            return "bad_header", [dump(header), *buffers]
        if kind == 7:
            header["padding"] = "p" * (self.limits["max_header_bytes"] + 10)
            return "header_too_large", [dump(header), *buffers]
        if kind == 8:
            raw = dump(header).replace(b'"v": 1,', b'"v": ' + r.choice(
                [b"0", b"2", b"1.0", b"true", b'"1"', b"null", b"[1]"]) + b",")
            return "unsupported_version", [raw, *buffers]
        if kind == 9:
            header["sensor"] = r.choice(["sonar", "CAMERA", 1, None, [], {"a": 1}])
            return "unknown_sensor", [dump(header), *buffers]
        if kind == 10:
            return "buffer_mismatch", [dump(header), *buffers[:-1]]
        if kind == 11:
            return "buffer_mismatch", [dump(header), *buffers, b"extra"]
        if kind == 12:
            header["buffers"][0]["name"] = r.choice(["CAM_TOP", "LIDAR_FRONT", 3])
            return "buffer_mismatch", [dump(header), *buffers]
        if kind == 13:
            return "buffer_mismatch", [dump(header), *buffers[:-1], buffers[-1] + b"xxxx"]
        if kind == 14:
            header["buffers"][-1]["dtype"] = r.choice(
                ["(-1,)f4", "f8", "<i4", "O", "", "V16", "u1,u1", 5, None, "(2,)u1", "<f4"
                 if sensor == "camera" else "|u1"])
            return "bad_dtype", [dump(header), *buffers]
        if kind == 15:
            shape = header["buffers"][-1]["shape"]
            if sensor == "camera":
                shape[r.randrange(3)] = r.choice([0, -1, self.limits["max_image_side"] + 1,
                                                  "8", 2.5, True])
            else:
                header["buffers"][-1]["shape"] = r.choice([[16, 3], [16], [4, 4, 4], [-1, 4],
                                                           ["16", 4]])
            return "bad_shape", [dump(header), *buffers]
        if kind == 16 and sensor == "camera":
            h, w = TOY_CAMERA
            header["buffers"][0]["shape"] = [h, w + 1, 3]
            odd = np.zeros((h, w + 1, 3), np.uint8).tobytes()
            return "bad_shape", [dump(header), odd, *buffers[1:]]
        if kind == 17:
            cut = r.randrange(0, len(buffers[-1]))
            return "truncated", [dump(header), *buffers[:-1], buffers[-1][:cut]]
        if kind == 18:
            points = self.limits["max_frame_bytes"] // 16 + r.randrange(1, 1000)
            header = {**header, "sensor": "lidar",
                      "buffers": [{"name": self.lidar_name, "dtype": "<f4",
                                   "shape": [points, 4]}]}
            return "too_large", [dump(header), bytes(points * 16)]
        if kind == 19:
            header = {**header, "sensor": "lidar",
                      "buffers": [{"name": self.lidar_name, "dtype": "<f4", "shape": [16, 4]}]}
            points = np.ones((16, 4), np.float32)
            points[r.randrange(16), r.randrange(4)] = r.choice([np.nan, np.inf, -np.inf])
            return "non_finite", [dump(header), points.tobytes()]
        if kind == 20:
            raw = dump(header)
            cut = raw.index(b'"timestamp": ') + len(b'"timestamp": ')
            end = raw.index(b",", cut)
            literal = r.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])
            return "non_finite", [raw[:cut] + literal + raw[end:], *buffers]
        if kind == 21 and sensor == "camera":
            header["ambient_light"] = 0.5
            raw = dump(header).replace(b'"ambient_light": 0.5',
                                       b'"ambient_light": ' + r.choice([b"NaN", b"1e999"]))
            return "non_finite", [raw, *buffers]
        if kind == 22 and sensor == "camera":  # valid, but not the size the encoder takes
            h, w = TOY_CAMERA[0] * 2, TOY_CAMERA[1]
            for spec in header["buffers"]:
                spec["shape"] = [h, w, 3]
            return "unsupported_frame", [dump(header),
                                         *[np.zeros((h, w, 3), np.uint8).tobytes()] * 6]
        if kind == 23 and self.accepted[sensor]:
            # Older than the sensor's newest accepted frame; one at a time (a run of
            # limits.clock_reset_frames would re-anchor the clock), a valid one follows.
            stale_header, stale_buffers = self._valid(sensor, stale=True)
            self._force_valid = sensor
            return "stale", [dump(stale_header), *stale_buffers]
        if kind == 24:
            return "bad_header", [b"", *buffers]
        return "bad_header", [b"null", *buffers]

    def generate(self, n: int, valid_fraction: float = 0.3
                 ) -> Iterator[tuple[str | None, str, list[bytes]]]:
        """``(expected drop reason or None, sensor, parts)``."""
        for _ in range(n):
            if self._force_valid or self.rng.random() < valid_fraction:
                sensor = self._force_valid or self.rng.choice(["camera", "lidar"])
                self._force_valid = None
                header, buffers = self._valid(sensor)
                self.accepted[sensor] += 1
                yield None, sensor, [self._dump(header), *buffers]
            else:
                reason, parts = self.malformed()
                yield reason, "", parts


def run_ingest_fuzz(n: int, seed: int = 0, tmp: Path | None = None) -> dict[str, Any]:
    import zmq

    from daemon.client import Client

    tmp = tmp or Path(tempfile.mkdtemp(prefix="mpnp-fuzz-ingest-"))
    fuzzer = IngestFuzzer(random.Random(seed), FUZZ_LIMITS)
    expected: Counter = Counter()
    crashes: list[str] = []
    rss: list[tuple[int, float]] = []
    started = time.monotonic()
    with _InProcessDaemon(tmp) as live:
        daemon, metrics = live.daemon, live.daemon.metrics
        in0, drop0 = metrics.frames_in.total(), metrics.frames_dropped.by_label("reason")
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.sndhwm = 1000
        push.connect(daemon.endpoints["ingest"])
        for i, (reason, _sensor, parts) in enumerate(fuzzer.generate(n)):
            expected[reason or "accepted"] += 1
            push.send_multipart(parts)  # blocking: PUSH/PULL loses nothing, it waits
            if (i + 1) % 1000 == 0:
                rss.append((i + 1, _rss_mb()))
                problem = live.crashed()
                if problem:
                    crashes.append(f"after {i + 1}: {problem}")
                    break

        def accounted() -> int:
            drops = metrics.frames_dropped.by_label("reason")
            return int(metrics.frames_in.total() - in0 + sum(
                v - drop0.get(k, 0) for k, v in drops.items()))

        deadline = time.monotonic() + 120
        while accounted() < sum(expected.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        drops = metrics.frames_dropped.by_label("reason")
        observed = {k: int(v - drop0.get(k, 0)) for k, v in drops.items() if v - drop0.get(k, 0)}
        observed["accepted"] = int(metrics.frames_in.total() - in0)
        # valid frames after the storm: all accepted, and a question about the last answered
        before = metrics.frames_in.total()
        after_n = 200
        for _ in range(after_n):
            reason, sensor, parts = next(iter(fuzzer.generate(1, valid_fraction=1.0)))
            push.send_multipart(parts)
        last_id = json.loads(parts[0])["frame_id"]
        deadline = time.monotonic() + 30
        while metrics.frames_in.total() < before + after_n and time.monotonic() < deadline:
            time.sleep(0.05)
        accepted_after = int(metrics.frames_in.total() - before)
        with Client(daemon.endpoints["query"], timeout_s=10, context=ctx) as client:
            reply = client.ask("is there a car?", last_id)
        push.close()
        ctx.term()
        final = live.crashed()
        if final:
            crashes.append(f"at the end: {final}")
    expected_d = dict(expected)
    mismatched = {k: {"expected": expected_d.get(k, 0), "observed": observed.get(k, 0)}
                  for k in set(expected_d) | set(observed)
                  if expected_d.get(k, 0) != observed.get(k, 0)}
    baseline = rss[0][1] if rss else None
    growth = (rss[-1][1] - baseline) / baseline if rss and baseline else None
    return {
        "messages": n, "expected": expected_d, "observed": observed, "mismatched": mismatched,
        "crashes": crashes, "valid_after": {"sent": after_n, "accepted": accepted_after,
                                            "answered_frame_id": reply["frame_id"]},
        "rss_mb": rss, "rss_growth_after_warmup": growth,
        "seconds": time.monotonic() - started,
        "passed": not crashes and not mismatched and accepted_after == after_n
        and reply["frame_id"] == last_id,
    }


# --- kill -----------------------------------------------------------------------------------

def _backend_section(backend: str, args: argparse.Namespace | None) -> dict[str, Any]:
    if backend == "fake":
        return {"backend": "daemon.testing:make_toy_backend",
                "options": {"state_bytes": 4_000_000, "step_delay_s": 0.02}}
    return {"backend": "mpnp", "options": {
        "model_store": getattr(args, "model_store", "") or "", "val_questions": 8,
        "eval_chunk": 4, "threads": getattr(args, "threads", 1) or 1}}


def _process_config(tmp: Path, backend: str, args: argparse.Namespace | None,
                    target_steps: int) -> Path:
    ipc = tmp / "s"
    ipc.mkdir(parents=True, exist_ok=True)
    config = {
        "endpoints": {"ingest": f"ipc://{ipc}/ingest", "query": f"ipc://{ipc}/query",
                      "events": f"ipc://{ipc}/events", "metrics": ""},
        "model": _backend_section(backend, args),
        "store": {"path": str(tmp / "store"), "keep_states": 1000},
        "policy": {"name": "fixed", "options": {"modalities": ["camera"]}},
        "power": {"monitor": "sim-orin", "options": {"switch_delay_s": 0.0,
                                                     "flops_scale": 100.0},
                  "poll_interval_s": 0.2},
        "adaptation": {"auto": False, "target_steps": target_steps, "min_steps": 1,
                       "deadline_s": 3600, "batch_size": 1, "n_max": 12},
    }
    path = tmp / "daemon.json"
    path.write_text(json.dumps(config))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run_kill(kills: int, backend: str = "mpnp", seed: int = 0,
             args: argparse.Namespace | None = None, tmp: Path | None = None,
             window_s: tuple[float, float] | None = None) -> dict[str, Any]:
    """SIGKILL the daemon ``kills`` times at random moments of adaptations."""
    from daemon.client import Client, DaemonError, DaemonTimeout, SensorPublisher
    from daemon.store import TEMP_PREFIX, ModelStore, StoreError
    from daemon.testing import toy_frame

    tmp = tmp or Path(tempfile.mkdtemp(prefix="mpnp-kill-"))
    fake = backend == "fake"
    config = _process_config(tmp, backend, args, target_steps=4 if fake else 6)
    window = window_s or ((0.2, 1.5) if fake else (5.0, 90.0))
    size = TOY_CAMERA if fake else WORLD_CAMERA  # what the (real) camera encoder takes
    ready_timeout = 60 if fake else 900
    rng = random.Random(seed)
    ipc = tmp / "s"
    rounds: list[dict[str, Any]] = []
    corrupt = failed_restarts = wrong_state = 0
    committed: set[int] = set()
    started = time.monotonic()
    errors: Counter = Counter()
    for k in range(kills + 1):  # the last start only checks the state left by the last kill
        with open(tmp / f"daemon-{k}.log", "wb") as log_file:  # a pipe nobody reads blocks
            proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config)],
                                    env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=log_file)
        row: dict[str, Any] = {"round": k}
        try:
            with Client(f"ipc://{ipc}/query", timeout_s=5) as client:
                status = None
                deadline = time.monotonic() + ready_timeout
                while time.monotonic() < deadline and proc.poll() is None:
                    try:
                        status = client.status()
                        break
                    except DaemonTimeout:
                        continue
                if status is None:
                    failed_restarts += 1
                    row["restart"] = "failed"
                    continue
                served = status["serving"]["generation"]
                store = ModelStore(tmp / "store", keep_states=None, lock=False)
                newest = store.latest_good_state()
                store.close()
                row.update(served=served, newest_in_store=newest.generation if newest else None)
                if newest is None or served != newest.generation or (
                        committed and served < max(committed)):
                    wrong_state += 1
                    row["wrong_state"] = True
                # the served state answers about a live frame
                with SensorPublisher(f"ipc://{ipc}/ingest") as publisher:
                    frame_id = f"k{k}"
                    frame = toy_frame(frame_id, timestamp=time.time(), size=size)
                    reply = None
                    for _ in range(50):
                        publisher.send_camera(frame)
                        publisher.send_lidar(frame)
                        try:
                            reply = client.ask("is there a car?", frame_id)
                            break
                        except (DaemonError, DaemonTimeout):
                            time.sleep(0.1)
                    row["answered"] = reply is not None
                if k == kills:
                    break
                kill_at = time.monotonic() + rng.uniform(*window)
                modalities = ["lidar"] if k % 2 == 0 else ["camera"]
                while time.monotonic() < kill_at:
                    try:
                        client.adapt("start", modalities, force_commit=True)
                        modalities = ["camera"] if modalities == ["lidar"] else ["lidar"]
                    except DaemonError as exc:
                        if exc.code != "conflict":  # conflict: the previous run goes on
                            errors[exc.code] += 1
                            log.warning("kill round %d: adapt start: %s", k, exc)
                    except DaemonTimeout:
                        errors["timeout"] += 1
                    try:
                        generation = client.status()["serving"]["generation"]
                        if generation is not None:
                            committed.add(generation)
                    except DaemonTimeout:
                        pass
                    time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            rounds.append(row)
        # after the kill: the store opens (recovering) and every entry verifies
        try:
            store = ModelStore(tmp / "store", keep_states=None)
            for entry in store.entries():
                try:
                    store.verify(entry.name)
                except StoreError:
                    corrupt += 1
            leftovers = list((tmp / "store").rglob(f"{TEMP_PREFIX}*"))
            corrupt += len(leftovers)
            store.close()
        except StoreError:
            corrupt += 1
    kills_done = len([r for r in rounds if "served" in r]) - 1
    return {
        "backend": backend, "kills": max(kills_done, 0), "planned_kills": kills,
        "corrupt_states": corrupt, "failed_restarts": failed_restarts,
        "wrong_state_served": wrong_state, "committed_generations": sorted(committed),
        "unanswered_after_restart": sum(1 for r in rounds if r.get("answered") is False),
        "request_errors": dict(errors), "logs": str(tmp),
        "rounds": rounds, "seconds": time.monotonic() - started,
        "passed": corrupt == 0 and failed_restarts == 0 and wrong_state == 0
        and kills_done == kills and all(r.get("answered", True) for r in rounds),
    }


# --- soak -----------------------------------------------------------------------------------

class _ToySource:
    def frame(self, index: int, light: float):
        from daemon.testing import toy_frame

        return toy_frame(f"s{index}", light=light, size=TOY_CAMERA)


def run_soak(minutes: float, backend: str = "mpnp", args: argparse.Namespace | None = None,
             tmp: Path | None = None, question_interval_s: float = 1.0) -> dict[str, Any]:
    """The rig rate for ``minutes`` with questions and back-to-back adaptations."""
    from daemon.client import Client, DaemonError, DaemonTimeout
    from daemon.config import DaemonConfig
    from daemon.server import Daemon
    from daemon.sim_vehicle import SimVehicle, SimVehicleConfig

    tmp = tmp or Path(tempfile.mkdtemp(prefix="mpnp-soak-"))
    fake = backend == "fake"
    if fake:
        from daemon.testing import ToyBackend

        model = ToyBackend(step_delay_s=0.02, camera_shape=TOY_CAMERA)
        source: Any = _ToySource()
    else:
        from daemon.demo import DemoFrameSource, _world_config
        from daemon.mpnp_backend import create_mpnp_backend

        model = create_mpnp_backend(**_backend_section("mpnp", args)["options"])
        source = DemoFrameSource(_world_config(model.prepared.data_dir))
    config = DaemonConfig.from_dict({
        "endpoints": {"ingest": "tcp://127.0.0.1:*", "query": "tcp://127.0.0.1:*",
                      "events": "tcp://127.0.0.1:*", "metrics": ""},
        "store": {"path": str(tmp / "store")},
        "policy": {"name": "fixed", "options": {"modalities": ["camera"]}},
        "power": {"monitor": "sim-orin", "options": {"switch_delay_s": 0.0,
                                                     "flops_scale": 100.0}},
        "adaptation": {"auto": False, "batch_size": 4, "target_steps": 20 if fake else 60,
                       "min_steps": 1, "deadline_s": 3600, "n_max": 12},
    })
    daemon = Daemon(config, model)
    thread = threading.Thread(target=daemon.run, name="soak-daemon", daemon=True)
    thread.start()
    if not daemon.ready.wait(600):
        raise RuntimeError("the soak daemon did not become ready")
    seconds = minutes * 60.0
    stop = threading.Event()
    latencies: list[float] = []
    errors: Counter = Counter()
    adaptations: Counter = Counter()
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.wait(max(min(5.0, seconds / 20), 0.1)):
            rss.append((time.monotonic() - t0, _rss_mb()))

    def ask() -> None:
        modalities = ["lidar"]
        with Client(daemon.endpoints["query"], timeout_s=120) as client:
            while not stop.wait(question_interval_s):
                try:
                    sent = time.monotonic()
                    client.ask("how many cars are there?")
                    latencies.append(time.monotonic() - sent)
                except DaemonError as exc:
                    errors[exc.code] += 1
                except DaemonTimeout:
                    errors["timeout"] += 1
                try:
                    if client.status()["adaptation"] is None:
                        client.adapt("start", modalities, force_commit=True)
                        adaptations["started"] += 1
                        modalities = ["camera"] if modalities == ["lidar"] else ["lidar"]
                except DaemonError as exc:
                    adaptations[f"refused_{exc.code}"] += 1
                except DaemonTimeout:
                    errors["timeout"] += 1

    metrics = daemon.metrics
    in0 = metrics.frames_in.total()
    drop0 = metrics.frames_dropped.by_label("reason")
    sampler = threading.Thread(target=sample, daemon=True)
    asker = threading.Thread(target=ask, daemon=True)
    sampler.start()
    asker.start()
    try:
        vehicle = SimVehicle(SimVehicleConfig(endpoint=daemon.endpoints["ingest"],
                                              camera_hz=12.0, lidar_hz=20.0,
                                              duration_s=seconds, world_interval_s=0.5,
                                              hwm=16), source)
        stats = vehicle.run()
        time.sleep(0.5)
    finally:
        stop.set()
        asker.join(300)
        sampler.join(10)
        status_adapt = metrics.adaptations.by_label("outcome")
        daemon.stop()
        thread.join(120)
    sent = stats.camera_sent + stats.lidar_sent
    accepted = metrics.frames_in.total() - in0
    drops = {k: v - drop0.get(k, 0) for k, v in metrics.frames_dropped.by_label("reason").items()
             if v - drop0.get(k, 0)}
    warm = [m for m in rss if m[0] >= seconds * 0.1] or rss
    growth = (warm[-1][1] - warm[0][1]) / warm[0][1] if warm else None
    fraction = accepted / max(sent, 1)
    return {
        "backend": backend, "minutes": minutes, "sent": sent,
        "sent_hz": stats.rates(), "publisher_dropped": stats.dropped,
        "world_frames": stats.world_frames, "world_frames_late": stats.late_frames,
        "accepted": int(accepted), "accepted_fraction": fraction, "dropped_by_daemon": drops,
        "questions": _latency(latencies), "errors": dict(errors),
        "adaptations": {**dict(adaptations), "finished": status_adapt},
        "rss_mb": rss, "rss_growth_after_warmup": growth,
        "passed": fraction >= TARGETS["frames_accepted_1x"]
        and (growth is not None and growth < TARGETS["rss_growth"]),
    }


# --- report ---------------------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    lines = ["# Daemon reliability suites", "",
             f"Machine: {result.get('machine', '')}. Seed {result.get('seed')}. The fuzz "
             "suites and the fake soak run the daemon in the benchmark's own process: RSS is "
             "that process's (daemon, client and the imported libraries).", ""]
    q = result.get("query_fuzz")
    if q:
        lines += ["## Query fuzz (fake backend, real sockets)", "",
                  f"{q['requests']} requests, {q['answered']} answered, unanswered "
                  f"{q['unanswered'] or 0}, crashes {len(q['crashes'])}, RSS growth after "
                  f"warm-up {_pct(q['rss_growth_after_warmup'])} "
                  f"({_rss_span(q['rss_mb'])}), {q['seconds']:.0f} s: "
                  f"**{'pass' if q['passed'] else 'FAIL'}**", "",
                  "| category | replies by code |", "|---|---|"]
        for category, codes in q["replies_by_category"].items():
            text = ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))
            lines.append(f"| {category} | {text} |")
        lines.append("")
    i = result.get("ingest_fuzz")
    if i:
        lines += ["## Ingest fuzz (fake backend, real sockets)", "",
                  f"{i['messages']} messages, crashes {len(i['crashes'])}, per-reason "
                  f"mismatches {len(i['mismatched'])}, valid frames after: "
                  f"{i['valid_after']['accepted']}/{i['valid_after']['sent']} accepted, RSS "
                  f"growth {_pct(i['rss_growth_after_warmup'])} "
                  f"({_rss_span(i['rss_mb'])}), {i['seconds']:.0f} s: "
                  f"**{'pass' if i['passed'] else 'FAIL'}**", "",
                  "| outcome | expected | counted by the daemon |", "|---|---|---|"]
        for key in sorted(set(i["expected"]) | set(i["observed"])):
            lines.append(f"| {key} | {i['expected'].get(key, 0)} | {i['observed'].get(key, 0)} |")
        lines.append("")
    k = result.get("kill")
    lines += ["## Kill (SIGKILL during adaptations)", ""]
    if k:
        lines += [f"Backend {k['backend']}: {k['kills']} kills, corrupt states "
                  f"{k['corrupt_states']}, failed restarts {k['failed_restarts']}, wrong state "
                  f"served {k['wrong_state_served']}, committed generations seen "
                  f"{len(k['committed_generations'])}, {k['seconds']:.0f} s: "
                  f"**{'pass' if k['passed'] else 'FAIL'}**", ""]
    else:
        lines += ["Not run in this result (`mpnp bench reliability --kill`, real backend: "
                  "needs `mpnp prepare`).", ""]
    s = result.get("soak")
    lines += ["## Soak (rig rate, questions, adaptations)", ""]
    if s:
        qs = s["questions"]
        lines += [f"Backend {s['backend']}, {s['minutes']:g} min: sent {s['sent']} "
                  f"({s['sent_hz']['camera_hz']:.1f} Hz camera, {s['sent_hz']['lidar_hz']:.1f} "
                  f"Hz LiDAR), accepted {s['accepted_fraction']:.2%}, daemon drops "
                  f"{s['dropped_by_daemon']}, RSS growth {_pct(s['rss_growth_after_warmup'])}, "
                  f"questions {qs['count']} p50 {_ms(qs['p50_s'])} p99 {_ms(qs['p99_s'])}, "
                  f"errors {s['errors']}, adaptations {s['adaptations']}: "
                  f"**{'pass' if s['passed'] else 'FAIL'}**", ""]
    else:
        lines += ["Not run in this result (`mpnp bench reliability --soak --minutes 30`, real "
                  "backend: needs `mpnp prepare`).", ""]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.0f} ms"


def _rss_span(samples: list) -> str:
    if not samples:
        return "no samples"
    return f"{samples[0][1]:.0f} -> {samples[-1][1]:.0f} MB"


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"seed": args.seed, "targets": TARGETS, "limits": FUZZ_LIMITS}
    if not args.no_fuzz:
        if args.query_fuzz:
            result["query_fuzz"] = run_query_fuzz(args.query_fuzz, args.seed)
            print(f"query fuzz: passed={result['query_fuzz']['passed']}", flush=True)
        if args.ingest_fuzz:
            result["ingest_fuzz"] = run_ingest_fuzz(args.ingest_fuzz, args.seed)
            print(f"ingest fuzz: passed={result['ingest_fuzz']['passed']}", flush=True)
    if args.kill:
        result["kill"] = run_kill(args.kills, args.backend, args.seed, args)
        print(f"kill: passed={result['kill']['passed']}", flush=True)
    if args.soak:
        result["soak"] = run_soak(args.minutes, args.backend, args)
        print(f"soak: passed={result['soak']['passed']}", flush=True)
    suites = [v for k, v in result.items() if isinstance(v, dict) and "passed" in v]
    result["passed"] = all(s["passed"] for s in suites)
    return result


def _run(args: argparse.Namespace) -> int:
    import platform

    from bench.cli import write_output

    for name in ("query_fuzz", "ingest_fuzz", "kills"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.minutes <= 0:
        raise ValueError("--minutes must be > 0")
    logging.getLogger("daemon").setLevel(logging.ERROR)  # the fuzz is meant to be noisy
    result = run_bench(args)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"load average at the end {load}")
    write_output(args.json, json.dumps(result, indent=2, default=str))
    write_output(args.markdown, markdown(result))
    print(markdown(result))
    return 0 if result["passed"] else 1
