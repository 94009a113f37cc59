"""The daemon process: IO threads around the engine, signals, systemd, shutdown.

Threads (only IO threads touch sockets):

- ``mpnp-ingest`` owns the PULL socket: receives sensor messages zero-copy, validates them and
  puts them straight into the engine's frame buffer (:meth:`Engine.ingest`, a lock, never a
  wait for a model step); bad ones are dropped, counted and logged.
- ``mpnp-io`` owns the ROUTER (requests) and PUB (events) sockets: decodes requests into typed
  :class:`~daemon.engine.Request` objects, answers malformed ones itself, answers ``busy`` when
  the bounded, per-client round-robin request queue is full, and sends the replies and events
  the engine puts in its outbox (a queue plus a wake-up pipe it polls).
- the main thread runs the engine loop, sends ``WATCHDOG=1`` and handles SIGTERM/SIGINT.

Neither IO thread may die of one message: every per-message step is guarded, and an
unexpected exception becomes an ``internal`` error reply (requests) or an ``internal`` drop
(ingest), logged with its traceback. Sizes are bounded before buffering: each socket's
ZeroMQ ``MAXMSGSIZE`` disconnects a peer sending a frame over the hard cap.

Shutdown is the :mod:`daemon.lifecycle` state machine: ``serving -> draining`` on a signal
(ingest stops, queued requests get ``shutting_down``, the adaptation is cancelled, the serving
state is flushed to the store, pending replies are sent), then sockets close with ``LINGER=0``
and the state is ``stopped``.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import Any

import zmq

from daemon.backend import ModelBackend, create_backend
from daemon.config import DaemonConfig
from daemon.engine import Engine, Request
from daemon.lifecycle import Lifecycle, State
from daemon.metrics import DaemonMetrics, MetricsServer
from daemon.protocol import (
    DropReason,
    ErrorCode,
    EventType,
    IngestError,
    MessageType,
    ProtocolError,
    WireReply,
    decode_request,
    decode_sensor_message,
    encode_event,
    encode_reply,
    error_reply,
)
from daemon.sdnotify import SystemdNotifier
from daemon.security import CurveServer
from daemon.store import ModelStore
from policies.context import ModalitySelector, create_policy
from policies.power import PowerMonitor, create_power_monitor

log = logging.getLogger(__name__)


#: Read-only requests the recording leaves out (it samples ``status`` itself).
_NOT_RECORDED = frozenset({MessageType.PING, MessageType.STATUS, MessageType.LIST_STORE})


class Outbox:
    """Replies and events for the IO thread: a queue plus a pipe the IO thread polls."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def put(self, kind: str, a: Any, b: Any) -> None:
        self.items.put((kind, a, b))
        try:
            os.write(self.write_fd, b"x")
        except BlockingIOError:  # the pipe is full: the IO thread is already woken
            pass

    def clear_wakeups(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class _RateLimitedLog:
    """Log the first few drops/bad requests per reason, then every 100th (a bad stream can be
    fast, and a log line per message would turn a flood into a disk-filling one)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def warn(self, reason: str, message: str) -> None:
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if n <= 5 or n % 100 == 0:
            log.warning("drop #%d (%s): %s", n, reason, message)


class Daemon:
    """Loads the backend once, binds, serves until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(
        self,
        config: DaemonConfig,
        backend: ModelBackend | None = None,
        monitor: PowerMonitor | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        self._backend = backend
        self._monitor = monitor
        self.notifier = notifier or SystemdNotifier()
        self.lifecycle = Lifecycle()
        self.metrics = DaemonMetrics()
        self.ready = threading.Event()
        self.endpoints: dict[str, str] = {}
        self.metrics_address: tuple[str, int] | None = None
        self.engine: Engine | None = None
        self._stop = threading.Event()
        self._force = threading.Event()
        self._io_stop = threading.Event()
        self._ingest_stop = threading.Event()
        self._outbox = Outbox()
        self._threads: list[threading.Thread] = []
        self._bound: dict[str, threading.Event] = {}
        self._io_errors: list[BaseException] = []
        self._drop_log = _RateLimitedLog()
        self._context: zmq.Context | None = None
        self._curve: CurveServer | None = None
        self._metrics_server: MetricsServer | None = None
        self._store: ModelStore | None = None
        self._heartbeat: float | None = None  # the engine loop's last completed step
        self._recorder: Any = None  # recording.writer.Recorder when [recording] has a path
        self._next_status_sample = 0.0

    # --- public -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the daemon to shut down (thread-safe; a second call skips the drain wait)."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    #: The engine loop must complete a step within this many seconds to count as live (a
    #: step is bounded: one batch of answers or one adaptation micro-step).
    LIVENESS_S = 60.0

    def health(self) -> dict[str, Any]:
        """Liveness (engine loop stepping, IO threads alive) and readiness (serving)."""
        beat = self._heartbeat
        age = None if beat is None else time.monotonic() - beat
        threads = {t.name: t.is_alive() for t in self._threads}
        live = (not self._io_errors and all(threads.values()) and age is not None
                and age < self.LIVENESS_S)
        engine = self.engine
        return {
            "live": live,
            "ready": live and self.lifecycle.state is State.SERVING,
            "state": self.lifecycle.state.value,
            "engine_step_age_s": age,
            "threads": threads,
            "queue": engine.pending() if engine is not None else None,
        }

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        self._install_signals()
        try:
            self._start()
        except Exception:
            log.exception("daemon failed to start")
            self._shutdown()
            return 1
        assert self.engine is not None  # set by _start
        self.lifecycle.to(State.SERVING)
        self.notifier.ready(f"serving {sorted(self.engine.serving)}")
        self.ready.set()
        self.engine.publish(EventType.LIFECYCLE, {"state": State.SERVING.value})
        log.info("daemon serving: %s", self.endpoints)
        interval = self.notifier.watchdog_interval_s
        next_watchdog = 0.0
        try:
            while not self._stop.is_set():
                self.engine.step(timeout=0.05)
                self._heartbeat = time.monotonic()
                if self._recorder is not None and self._heartbeat >= self._next_status_sample:
                    self._record_status()
                if interval and time.monotonic() >= next_watchdog:
                    self.notifier.watchdog()
                    next_watchdog = time.monotonic() + interval / 2
                if self._io_errors:
                    raise RuntimeError(f"an IO thread died: {self._io_errors[0]!r}")
        except Exception:
            log.exception("engine loop failed")
            self._shutdown()
            return 1
        self._shutdown()
        return 0

    # --- startup ------------------------------------------------------------------------

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def _start(self) -> None:
        cfg = self.config
        self.lifecycle.to(State.LOADING)
        self.notifier.status("loading the model")
        backend = self._backend or create_backend(cfg.model.backend, cfg.model.options)
        monitor = self._monitor or create_power_monitor(cfg.power.monitor, **cfg.power.options)
        self._monitor = monitor
        self._store = ModelStore(cfg.store.directory, int(cfg.store.memory_budget_mb * 2**20),
                                 cfg.store.keep_states)
        selector = ModalitySelector(create_policy(cfg.policy.name, **cfg.policy.options))
        if cfg.recording.path:
            from mpnp import __version__
            from recording.writer import Recorder

            self._recorder = Recorder(cfg.recording, library=f"mpnp {__version__}")
        self.engine = Engine(cfg, backend, self._store, selector, monitor, self.metrics,
                             publish=self._publish)
        self.engine.start()
        self._context = zmq.Context()
        if cfg.security.curve:
            self._curve = CurveServer(self._context, cfg.security.server_secret_key,
                                      cfg.security.client_keys_dir)
        self._spawn("mpnp-io", self._io_loop)
        self._spawn("mpnp-ingest", self._ingest_loop)
        for name, event in self._bound.items():
            if not event.wait(timeout=10) or self._io_errors:
                raise RuntimeError(f"{name} could not bind: {self._io_errors or 'timeout'}")
        if cfg.endpoints.metrics:
            host, _, port = cfg.endpoints.metrics.rpartition(":")
            self._metrics_server = MetricsServer(self.metrics, host, int(port), self.health)
            self._metrics_server.start()
            self.metrics_address = self._metrics_server.address

    def _publish(self, kind: EventType, body: dict[str, Any]) -> None:
        self._outbox.put("event", kind, body)
        if self._recorder is not None:
            self._recorder.event(kind.value, body)

    def _record_status(self) -> None:
        """A ``status`` sample into the recording (engine thread: status reads its state)."""
        assert self.engine is not None
        self._next_status_sample = time.monotonic() + self.config.recording.status_interval_s
        try:
            self._recorder.status(self.engine.status())
        except Exception:  # the recording is best effort; serving goes on
            log.exception("recording: status sample failed")

    def _spawn(self, name: str, target: Any) -> None:
        self._bound[name] = threading.Event()

        def runner() -> None:
            try:
                target(self._bound[name])
            except BaseException as exc:  # report to the main loop, which shuts down
                log.exception("%s thread failed", name)
                self._io_errors.append(exc)
                self._bound[name].set()

        thread = threading.Thread(target=runner, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    # --- IO threads ---------------------------------------------------------------------

    def _socket(self, kind: int, endpoint: str, name: str, max_message: int = -1) -> zmq.Socket:
        assert self._context is not None
        sock = self._context.socket(kind)
        sock.linger = 0
        if max_message > 0:
            # Checked by libzmq while a frame arrives: a bigger one disconnects the peer
            # before it is buffered (a 256 MiB frame used to be received in full first).
            sock.setsockopt(zmq.MAXMSGSIZE, max_message)
        if self._curve is not None:
            self._curve.secure(sock)
        sock.bind(endpoint)
        self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    @property
    def request_frame_cap(self) -> int:
        """Hard cap (ZeroMQ ``MAXMSGSIZE``) on one request frame: bodies between
        ``max_request_bytes`` and this get a ``too_large`` reply, bigger ones a disconnect."""
        return 2 * self.config.limits.max_request_bytes + 1024

    @property
    def ingest_frame_cap(self) -> int:
        """Hard cap on one ingest frame; between the limits and this: a counted drop."""
        limits = self.config.limits
        return 2 * max(limits.max_frame_bytes, limits.max_header_bytes) + 1024

    def _ingest_loop(self, bound: threading.Event) -> None:
        cfg = self.config
        sock = self._socket(zmq.PULL, cfg.endpoints.ingest, "ingest", self.ingest_frame_cap)
        sock.rcvhwm = cfg.endpoints.ingest_hwm
        bound.set()
        engine = self.engine
        assert engine is not None
        try:
            while not self._ingest_stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart(copy=False)
                try:
                    message = decode_sensor_message(frames, cfg.limits)
                    reason = engine.ingest(message)
                    if reason is None and self._recorder is not None:
                        self._recorder.sensor(frames)  # holds the frames, never waits
                except IngestError as exc:
                    self.metrics.frames_dropped.inc(reason=exc.reason.value)
                    self._drop_log.warn(exc.reason.value, str(exc))
                    continue
                except Exception:  # a validation bug: drop the message, never the thread
                    self.metrics.frames_dropped.inc(reason=DropReason.INTERNAL.value)
                    log.exception("ingest: unexpected error on a message; dropped")
                    continue
                if reason is not None and reason is not DropReason.STALE:
                    self._drop_log.warn(reason.value, "not accepted by the engine")
        finally:
            sock.close(linger=0)

    def _io_loop(self, bound: threading.Event) -> None:
        cfg = self.config
        router = self._socket(zmq.ROUTER, cfg.endpoints.query, "query", self.request_frame_cap)
        pub = self._socket(zmq.PUB, cfg.endpoints.events, "events")
        pub.sndhwm = 1000
        bound.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._outbox.read_fd, zmq.POLLIN)
        try:
            while not self._io_stop.is_set():
                ready = dict(poller.poll(100))
                if router in ready:
                    self._receive_request(router)
                if self._outbox.read_fd in ready:
                    self._outbox.clear_wakeups()
                self._flush_outbox(router, pub)
        finally:
            self._flush_outbox(router, pub)
            router.close(linger=0)
            pub.close(linger=0)

    def _receive_request(self, router: zmq.Socket) -> None:
        # Drain what is there (bounded per wake-up so the outbox is flushed in between):
        # a flood is answered ``busy`` at the rate it arrives instead of piling up in zmq.
        for _ in range(256):
            try:
                frames = router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            # Envelope: identity, then an empty delimiter when the client is REQ (or a
            # DEALER that mimics it); everything after is the message.
            split = frames.index(b"") + 1 if b"" in frames[:2] else 1
            envelope, parts = frames[:split], frames[split:]
            try:
                self._handle_request(envelope, parts)
            except Exception:  # a bug on one request must not kill the IO thread
                log.exception("unexpected error handling a request")
                self.metrics.errors.inc(code=ErrorCode.INTERNAL.value)
                self._outbox.put("reply", envelope, error_reply(
                    ErrorCode.INTERNAL, "internal error while reading the request", None))

    def _handle_request(self, envelope: list[bytes], parts: list[bytes]) -> None:
        def reply(response: WireReply) -> None:
            self._outbox.put("reply", envelope, response)

        try:
            wire = decode_request(parts, self.config.limits.max_request_bytes)
            if self._recorder is not None and wire.type not in _NOT_RECORDED:
                reply = self._recording_reply(wire, reply)
        except ProtocolError as exc:
            self.metrics.errors.inc(code=exc.code.value)
            self._drop_log.warn(f"request {exc.code.value}",
                                f"bad request: {exc.code.value}: {exc.message[:200]}")
            reply(error_reply(exc.code, exc.message, exc.request_id))
            return
        state = self.lifecycle.state
        if state in (State.STARTING, State.LOADING):
            # The sockets are bound a moment before the state is serving: a request in that
            # window is told to retry, not that the daemon is going away.
            self.metrics.errors.inc(code=ErrorCode.BUSY.value)
            reply(error_reply(ErrorCode.BUSY, "the daemon is starting; retry", wire.id))
            return
        if not self.lifecycle.accepting:
            self.metrics.errors.inc(code=ErrorCode.SHUTTING_DOWN.value)
            reply(error_reply(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down", wire.id))
            return
        assert self.engine is not None
        request = Request(wire.type, wire.id, wire.body, reply, client=envelope[0])
        if not self.engine.submit(request):
            self.metrics.errors.inc(code=ErrorCode.BUSY.value)
            limits = self.config.limits
            reply(error_reply(ErrorCode.BUSY, (
                f"request queue full (at most {limits.max_pending_requests} pending, "
                f"{limits.max_pending_per_client} per client); retry later"), wire.id))

    def _recording_reply(self, wire: Any, reply: Any) -> Any:
        """``reply`` that also records the request and its reply (and the latency)."""
        received = time.monotonic()
        recorder = self._recorder

        def recorded(response: WireReply) -> None:
            reply(response)
            recorder.request(wire.type.value, {**wire.body, "id": wire.id},
                             response.status.value, response.body,
                             time.monotonic() - received)

        return recorded

    def _flush_outbox(self, router: zmq.Socket, pub: zmq.Socket) -> None:
        while True:
            try:
                kind, a, b = self._outbox.items.get_nowait()
            except queue.Empty:
                return
            try:
                if kind == "reply":
                    reply: WireReply = b
                    router.send_multipart([*a, *self._encode_reply(reply)], flags=zmq.NOBLOCK)
                else:
                    pub.send_multipart(encode_event(a, b), flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("dropped an outgoing %s: peer not reading", kind)
            except zmq.ZMQError as exc:  # e.g. the client went away (ROUTER_MANDATORY off)
                log.warning("could not send %s: %s", kind, exc)
            except Exception:  # an event that cannot be encoded is lost, not the thread
                log.exception("could not encode an outgoing %s", kind)

    def _encode_reply(self, reply: WireReply) -> list[bytes]:
        """Encode a reply; one that cannot be (a non-finite float, say) becomes ``internal``
        for the same id rather than an exception in the IO thread."""
        try:
            return encode_reply(reply)
        except (ValueError, TypeError) as exc:
            log.error("reply %s could not be encoded (%s); answering internal", reply.id, exc)
            self.metrics.errors.inc(code=ErrorCode.INTERNAL.value)
            return encode_reply(error_reply(ErrorCode.INTERNAL,
                                            f"reply not encodable: {exc}", reply.id))

    # --- shutdown -----------------------------------------------------------------------

    def _shutdown(self) -> None:
        state = self.lifecycle.state
        if state is State.STARTING:
            self.lifecycle.to(State.STOPPED)
            return
        if state is not State.DRAINING:
            self.lifecycle.to(State.DRAINING)
        self.notifier.stopping()
        self._ingest_stop.set()
        if self.engine is not None:
            self.engine.publish(EventType.LIFECYCLE, {"state": State.DRAINING.value})
            try:
                self.engine.drain()
            except Exception:
                log.exception("drain failed; stopping anyway")
            if self._recorder is not None:
                self._record_status()
        time.sleep(0 if self._force.is_set() else 0.05)  # let the IO thread send the last replies
        self._io_stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        if self._recorder is not None:
            self._recorder.close()
            log.info("recording closed: %s", self._recorder.counters())
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._curve is not None:
            self._curve.stop()
        if self._context is not None:
            self._context.term()
        if self._store is not None:
            self._store.close()
        if self._monitor is not None:
            self._monitor.close()
        self._outbox.close()
        self.lifecycle.to(State.STOPPED)
        log.info("daemon stopped")


def run_daemon(config: DaemonConfig, backend: ModelBackend | None = None) -> int:
    return Daemon(config, backend).run()
