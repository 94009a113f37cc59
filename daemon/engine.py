"""The engine: the one loop that owns the model.

A pure core, usable in-process (tests drive :meth:`Engine.step` directly): IO threads hand it
typed :class:`Request` objects and decoded sensor messages through thread-safe queues and get
replies and events back through callbacks; the engine never touches a socket. Each step:

1. feed the context policy with the sensor samples that arrived (the ingest thread already
   put the frames themselves into the frame buffer: ingest never waits for a model step);
2. serve every pending request: questions are batched into one backend call and answered with
   the *serving* state; control commands are applied;
3. poll the power monitor (mode changes re-plan a running adaptation);
4. let the policy/override trigger Select -> Reconnect -> Adapt when the desired modality set
   differs from the serving one (with ``adaptation.compose`` on, a set that has no stored
   state but one stored state per modality is first *composed* from them, training-free,
   and served if it validates better; then fine-tuned from when ``compose = "finetune"``);
5. run **one** adaptation step, only when no request is waiting; so queries always come first
   and are answered with the last good state while an adaptation runs.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daemon.adaptation import AdaptationController, Publish
from daemon.backend import ComposeError, ComposeInput, ModelBackend, can_compose
from daemon.config import DaemonConfig
from daemon.frames import FrameBuffer
from daemon.metrics import DaemonMetrics
from daemon.protocol import (
    PROTOCOL_VERSION,
    DropReason,
    ErrorCode,
    EventType,
    MessageType,
    ProtocolError,
    ReplyStatus,
    SensorMessage,
    WireReply,
    error_reply,
)
from daemon.queues import FairQueue
from daemon.samples import LiveSample, LiveSamples
from daemon.store import ModelStore, StoreError
from daemon.teaching import (
    object_samples,
    parse_objects,
    question_count,
    samples_from_candidates,
    scene_free_questions,
    taught_pair,
)
from policies.budget import BudgetPlanner
from policies.context import ContextSample, ModalitySelector, modality_set
from policies.power import ModeChange, ModeChangeStatus, PowerMonitor
from scenes.questions import AnswerBalancer, Candidate

log = logging.getLogger(__name__)


@dataclass
class Request:
    """A decoded request on its way to the engine, with where its reply goes."""

    type: MessageType
    id: str
    body: dict[str, Any]
    reply: Callable[[WireReply], None]
    received_at: float = field(default_factory=time.monotonic)
    client: Hashable = b""  # the ROUTER identity: the fairness key of the request queue
    # The frame a question names, resolved when it arrived (with the serving set then): a
    # question that waits behind a long model step still finds a frame that has meanwhile
    # left the bounded history.
    pinned: tuple[frozenset[str], Any] | None = None


def _ok(request: Request, **body: Any) -> None:
    request.reply(WireReply(ReplyStatus.OK, request.id, body))


def _fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"unknown fields {unknown}; allowed: {sorted(allowed)}")


def _string(body: dict[str, Any], name: str, max_len: int, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"field {name!r} must be a non-empty string of <= {max_len} chars")
    return value


def _modalities(body: dict[str, Any], name: str = "modalities") -> frozenset[str]:
    value = body.get(name)
    if not isinstance(value, list):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} must be a list of names")
    try:
        return modality_set(value, name)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None


class Engine:
    def __init__(
        self,
        config: DaemonConfig,
        backend: ModelBackend,
        store: ModelStore,
        selector: ModalitySelector,
        monitor: PowerMonitor,
        metrics: DaemonMetrics | None = None,
        publish: Publish | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.store = store
        self.selector = selector
        # The context policy, not a modality's name, says which context's data trains and
        # validates an adaptation (for backends that train on context data).
        use_data_context = getattr(backend, "use_data_context", None)
        if callable(use_data_context):
            use_data_context(selector.data_context)
        # Live samples (teach / objects / pseudo_label) by data context, on disk; whether
        # an adaptation trains on them is ``adaptation.data`` (backends that can).
        settings = config.samples
        self.samples = LiveSamples(
            settings.directory(Path(store.root)), int(settings.max_mb * 1024 * 1024),
            settings.max_samples, config.adaptation.min_samples,
            config.adaptation.val_fraction, config.adaptation.data)
        self._balancer = AnswerBalancer(np.random.default_rng(settings.seed))
        self._question_rng = np.random.default_rng(settings.seed + 1)
        self._next_pseudo = 0.0
        self._last_pseudo: tuple[str, float] | None = None
        use_live = getattr(backend, "use_live_samples", None)
        if callable(use_live):
            use_live(self.samples)
        elif config.adaptation.data != "world":
            log.warning("adaptation.data = %r, but the backend %s cannot train on live "
                        "samples: it adapts on its own data", config.adaptation.data,
                        type(backend).__name__)
        self.monitor = monitor
        self.metrics = metrics or DaemonMetrics()
        self._publish_cb = publish or (lambda kind, body: None)
        self.frames = FrameBuffer(config.limits.frame_history)
        self.adaptation = AdaptationController(
            backend, store, BudgetPlanner(config.adaptation.planner()), self.publish,
            config.adaptation.progress_every,
        )
        self._serving: frozenset[str] = frozenset(config.adaptation.initial_modalities)
        self.serving_generation: int | None = None
        self._dirty = False  # serving state committed but not saved yet
        limits = config.limits
        self._inbox: FairQueue[Request] = FairQueue(limits.max_pending_requests,
                                                    limits.max_pending_per_client)
        self._sensor_lock = threading.Lock()
        # Policy samples only (the frames are in self.frames already): bounded, oldest out.
        self._samples: collections.deque[ContextSample] = collections.deque(
            maxlen=config.endpoints.ingest_queue)
        self._last_sensor_ts: dict[str, float] = {}
        self._behind: dict[str, int] = {}  # consecutive frames older than the newest
        check = getattr(backend, "check_frame", None)
        self._check_frame: Callable[[str, dict[str, Any]], str | None] | None = (
            check if callable(check) else None)
        count = getattr(backend, "count_tokens", None)
        self._count_tokens: Callable[[str], int] | None = count if callable(count) else None
        self._last_desired: frozenset[str] | None = None
        self._gave_up_on: frozenset[str] | None = None
        # A set whose composition failed or lost the gate: the policy adapts it instead.
        self._no_compose_for: frozenset[str] | None = None
        self._pending_mode: tuple[ModeChange, Request] | None = None
        self._last_mode: str | None = None
        self._next_power_poll = 0.0
        self.last_reading: dict[str, Any] | None = None
        self.started_at = time.monotonic()
        self.accepting = True

    @property
    def serving(self) -> frozenset[str]:
        """The modality set being served: the backend's own word where it can say
        (``serving_modalities()``), so the engine and the backend cannot disagree."""
        own = getattr(self.backend, "serving_modalities", None)
        return frozenset(own()) if callable(own) else self._serving

    @serving.setter
    def serving(self, modalities: frozenset[str]) -> None:
        # The engine's own record: what it last switched to (an event's "previous" reads
        # it, since by then the backend already serves the new set).
        self._serving = frozenset(modalities)

    # --- called from IO threads ---------------------------------------------------------

    def submit(self, request: Request) -> bool:
        """Queue a request; ``False`` when the bounded queue (or its client's share) is full:
        the caller answers ``busy``."""
        if request.type is MessageType.QUERY:
            frame_id = request.body.get("frame_id")
            if isinstance(frame_id, str) and 0 < len(frame_id) <= 128:
                serving = self.serving  # one read of an immutable set (engine-owned)
                try:
                    request.pinned = (serving, self.frames.frame(serving, frame_id))
                except ProtocolError:
                    pass  # not here (yet): the engine resolves it and answers the error
        return self._inbox.put(request.client, request)

    def pending(self) -> int:
        """Requests waiting in the queue."""
        return len(self._inbox)

    def ingest(self, message: SensorMessage) -> DropReason | None:
        """Accept a decoded sensor message into the frame buffer (any thread; never waits
        for the model). Returns the drop reason (counted here) when it is not accepted."""
        if self._check_frame is not None:
            try:
                problem = self._check_frame(message.sensor, message.arrays)
            except Exception:  # a backend bug must not stop ingest
                log.exception("backend.check_frame failed; accepting the frame")
                problem = None
            if problem:
                self.metrics.frames_dropped.inc(reason=DropReason.UNSUPPORTED_FRAME.value)
                log.debug("frame %s dropped: %s", message.frame_id, problem)
                return DropReason.UNSUPPORTED_FRAME
        with self._sensor_lock:
            last = self._last_sensor_ts.get(message.sensor)
            if last is not None and message.timestamp < last:
                behind = self._behind.get(message.sensor, 0) + 1
                if behind <= self.config.limits.clock_reset_frames:
                    self._behind[message.sensor] = behind
                    self.metrics.frames_dropped.inc(reason=DropReason.STALE.value)
                    return DropReason.STALE
                # A run of frames behind the newest: the sensor clock was reset, or the
                # newest was stamped in the future. Refusing them all would block the sensor
                # until a restart; accept this one and re-anchor on it.
                self.metrics.clock_resets.inc(sensor=message.sensor)
                log.warning("%s: %d frames in a row older than %.17g: clock reset, re-anchored "
                            "on frame %s at %.17g", message.sensor, behind - 1, last,
                            message.frame_id[:40], message.timestamp)
            self._behind[message.sensor] = 0
            self._last_sensor_ts[message.sensor] = message.timestamp
            self.frames.add(message)
            cameras = message.arrays if message.sensor == "camera" else None
            self._samples.append(ContextSample(message.timestamp, cameras,
                                               message.ambient_light))
        self.metrics.frames_in.inc(sensor=message.sensor)
        return None

    def publish(self, kind: EventType, body: dict[str, Any]) -> None:
        try:
            self._publish_cb(kind, body)
        except Exception:  # events are best effort; never break the engine
            log.exception("publishing %s failed", kind.value)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Resume with the last good adapted state in the store, if any."""
        attach = getattr(self.backend, "attach_store", None)
        if callable(attach):  # backends that load encoders on demand from the store
            attach(self.store)
        for entry in self.store.states():
            try:
                self.store.verify(entry.name)
                self.backend.load_state(self.store.path(entry))
            except (StoreError, OSError, RuntimeError, ValueError) as exc:
                log.error("cannot resume from %s: %s; trying an older state", entry.name, exc)
                continue
            self.serving = frozenset(entry.meta.get("modalities", sorted(self.serving)))
            self.serving_generation = entry.generation
            log.info("resumed adapted state generation %d for %s", entry.generation,
                     sorted(self.serving))
            break
        if self.serving_generation is None:
            # The shipped (offline) state goes into the store too, so that returning to
            # this modality set later is a Reconnect from the store, not a new adaptation.
            self._save_serving({"reason": "initial state", "source": "initial"})
        self._poll_power(force=True)

    def drain(self) -> None:
        """Stop accepting, answer what is queued with ``shutting_down``, flush the state."""
        self.accepting = False
        for request in self._inbox.drain():
            self._error(request, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        if self._pending_mode is not None:
            change, request = self._pending_mode
            self._error(request, ErrorCode.SHUTTING_DOWN, f"mode change to {change.target} "
                        "was requested; check the mode after restart")
            self._pending_mode = None
        self.adaptation.cancel("daemon shutting down")
        if self._dirty:
            self._save_serving({"reason": "flush at shutdown"})
        self.monitor.note_activity(False)

    # --- the loop -----------------------------------------------------------------------

    def step(self, timeout: float = 0.05) -> None:
        self._drain_sensors()
        block = not self.adaptation.active
        requests = self._take_requests(timeout if block else 0.0)
        self._serve(requests)
        for part in (self._poll_power, self._update_policy, self._auto_pseudo_label):
            try:
                part()
            except Exception:  # a monitor/policy fault must not stop the serving loop
                log.exception("engine %s failed; serving goes on", part.__name__)
                self.metrics.errors.inc(code=ErrorCode.INTERNAL.value)
        if self.adaptation.active and self._inbox.empty():
            result = self.adaptation.step()
            if result is not None:
                self._after_run(result)
            run = self.adaptation.run
            self.metrics.adaptation_progress.set(
                run.steps_done / max(run.steps_planned, 1) if run else 0.0)
        self.metrics.adaptation_active.set(1.0 if self.adaptation.active else 0.0)
        self.metrics.queue_depth.set(len(self._inbox))
        self.metrics.uptime.set(time.monotonic() - self.started_at)

    def _drain_sensors(self) -> None:
        with self._sensor_lock:
            samples = list(self._samples)
            self._samples.clear()
        for sample in samples:
            self.selector.observe(sample)

    def _take_requests(self, timeout: float) -> list[Request]:
        """Up to ``4 * max_batch`` requests, round-robin over clients; those that waited
        over ``limits.max_queue_wait_s`` are answered ``busy`` instead of computed."""
        requests: list[Request] = []
        first = True
        while len(requests) < 4 * self.config.limits.max_batch:
            request = self._inbox.get(timeout if first else 0.0)
            first = False
            if request is None:
                break
            if not self._expired(request):
                requests.append(request)
        return requests

    def _expired(self, request: Request) -> bool:
        """Answer ``busy`` (and return True) when ``request`` waited over the time budget."""
        limit = self.config.limits.max_queue_wait_s
        waited = time.monotonic() - request.received_at
        if waited <= limit:
            return False
        self._error(request, ErrorCode.BUSY,
                    f"waited {waited:.1f}s in the queue (limit {limit:g}s); retry")
        return True

    def _error(self, request: Request, code: ErrorCode, message: str) -> None:
        self.metrics.errors.inc(code=code.value)
        log.warning("request %s (%s) -> %s: %s", request.id, request.type.value, code.value,
                    message)
        request.reply(error_reply(code, message, request.id))

    # --- requests -----------------------------------------------------------------------

    def _serve(self, requests: list[Request]) -> None:
        queries: list[tuple[Request, str, Any]] = []
        for request in requests:
            self.metrics.requests.inc(type=request.type.value)
            if not self.accepting:
                self._error(request, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
                continue
            try:
                if request.type is MessageType.QUERY:
                    queries.append(self._prepare_query(request))
                else:
                    self._control(request)
            except ProtocolError as exc:
                self._error(request, exc.code, exc.message)
            except Exception as exc:  # a bug must not take the daemon down
                log.exception("request %s failed", request.id)
                self._error(request, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        batch = self.config.limits.max_batch
        for start in range(0, len(queries), batch):
            # Re-checked per batch: the batches before this one took time too.
            self._answer([q for q in queries[start:start + batch] if not self._expired(q[0])])

    def _prepare_query(self, request: Request) -> tuple[Request, str, Any]:
        body = request.body
        _fields(body, {"question", "frame_id"})
        limits = self.config.limits
        question = _string(body, "question", limits.max_question_chars)
        frame_id = _string(body, "frame_id", 128, required=False)
        assert question is not None
        size = len(question.encode("utf-8", "surrogatepass"))
        if size > limits.max_question_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"question of {size} UTF-8 bytes "
                                f"(limit {limits.max_question_bytes})")
        if self._count_tokens is not None:
            tokens = self._count_tokens(question)
            if tokens > limits.max_question_tokens:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"question of {tokens} tokens "
                                    f"(limit {limits.max_question_tokens})")
        pinned = request.pinned
        if frame_id is not None and pinned is not None and pinned[0] == self.serving:
            frame = pinned[1]
        else:
            frame = self.frames.frame(self.serving, frame_id)
        return request, question, frame

    def _answer(self, queries: list[tuple[Request, str, Any]]) -> None:
        if not queries:
            return
        modalities = self.serving
        try:
            answers = self.backend.answer([q for _, q, _ in queries], [f for _, _, f in queries],
                                          modalities)
            if len(answers) != len(queries):
                raise RuntimeError(f"backend gave {len(answers)} answers to {len(queries)}")
        except Exception as exc:
            if len(queries) > 1:
                # One bad question or frame must not fail the others batched with it:
                # answer each alone, so only the one that fails gets the error.
                log.warning("backend.answer failed on a batch of %d (%s); answering one by one",
                            len(queries), exc)
                for query in queries:
                    self._answer([query])
                return
            log.exception("backend.answer failed")
            for request, _, _ in queries:
                self._error(request, ErrorCode.BACKEND_ERROR, f"{type(exc).__name__}: {exc}")
            return
        now = time.monotonic()
        for (request, _, frame), answer in zip(queries, answers):
            latency = now - request.received_at
            self.metrics.queries.inc()
            self.metrics.query_latency.observe(latency)
            _ok(request, answer=str(answer), modalities=sorted(modalities),
                frame_id=frame.frame_id, frame_timestamp=frame.timestamp,
                latency_s=latency, state_generation=self.serving_generation)

    def _control(self, request: Request) -> None:
        body = request.body
        kind = request.type
        if kind is MessageType.PING:
            _fields(body, set())
            _ok(request, pong=True, protocol=PROTOCOL_VERSION)
        elif kind is MessageType.STATUS:
            _fields(body, set())
            _ok(request, **self.status())
        elif kind is MessageType.LIST_STORE:
            _fields(body, set())
            _ok(request, **self.store.summary())
        elif kind is MessageType.SET_MODALITY:
            self._set_modality(request)
        elif kind is MessageType.ADAPT:
            self._adapt_command(request)
        elif kind is MessageType.SET_POWER_MODE:
            self._set_power_mode(request)
        elif kind is MessageType.COMPOSE:
            self._compose_command(request)
        elif kind is MessageType.TEACH:
            self._teach(request)
        elif kind is MessageType.OBJECTS:
            self._objects(request)
        elif kind is MessageType.PSEUDO_LABEL:
            self._pseudo_label(request)
        else:
            raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"{kind.value} is not handled")

    def _set_modality(self, request: Request) -> None:
        body = request.body
        mode = body.get("mode")
        if mode == "auto":
            _fields(body, {"mode"})
            self.selector.release()
        elif mode == "forced":
            _fields(body, {"mode", "modalities"})
            self.selector.force(_modalities(body))
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'mode' must be 'auto' or 'forced'")
        self._update_policy()
        _ok(request, mode=self.selector.mode, desired=sorted(self.selector.desired()),
            serving=sorted(self.serving))

    def _adapt_command(self, request: Request) -> None:
        body = request.body
        action = body.get("action")
        if action == "start":
            _fields(body, {"action", "modalities", "force_commit"})
            target = _modalities(body) if "modalities" in body else self.selector.desired()
            force = body.get("force_commit", False)
            if not isinstance(force, bool):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'force_commit' must be a bool")
            if self.adaptation.active:
                raise ProtocolError(ErrorCode.CONFLICT, "an adaptation is already running; "
                                    "stop it first")
            plan = self._start_run(target, "operator", force)
            if plan is None or not plan.feasible:
                reason = plan.reason if plan else "no power budget available"
                raise ProtocolError(ErrorCode.POWER_ERROR, f"cannot adapt now: {reason}")
            _ok(request, started=True, plan=plan.to_dict())
        elif action in ("stop", "commit"):
            _fields(body, {"action"})
            if not self.adaptation.active:
                raise ProtocolError(ErrorCode.CONFLICT, "no adaptation is running")
            if action == "stop":
                result = self.adaptation.cancel("stopped by operator")
            else:
                result = self.adaptation.finish(force=True)
            if result is not None:
                self._after_run(result)
            _ok(request, result=result)
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                "field 'action' must be 'start', 'stop' or 'commit'")

    def _compose_command(self, request: Request) -> None:
        """``compose``: an operator asks for a training-free composition of stored states."""
        from daemon.config import COMPOSE_METHODS

        body = request.body
        _fields(body, {"modalities", "method", "finetune", "force_commit"})
        target = _modalities(body)
        settings = self.config.adaptation
        method = body.get("method", settings.compose_method)
        if method not in COMPOSE_METHODS:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"field 'method' must be one of "
                                f"{list(COMPOSE_METHODS)}, got {str(method)[:40]!r}")
        finetune = body.get("finetune", settings.compose == "finetune")
        force = body.get("force_commit", False)
        for name, value in (("finetune", finetune), ("force_commit", force)):
            if not isinstance(value, bool):
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} must be a bool")
        if len(target) < 2:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "compose needs two or more modalities "
                                f"(got {sorted(target)}); one is a Reconnect or an adapt")
        if not can_compose(self.backend):
            raise ProtocolError(ErrorCode.BACKEND_ERROR, f"the model backend "
                                f"({type(self.backend).__name__}) cannot compose states")
        if self.adaptation.active:
            raise ProtocolError(ErrorCode.CONFLICT, "an adaptation is already running; "
                                "stop it first")
        inputs, missing = self._compose_inputs(target)
        if missing:
            raise ProtocolError(ErrorCode.STORE_ERROR, f"no stored single-modality state for "
                                f"{missing}: compose needs one per modality of "
                                f"{sorted(target)} (adapt those first)")
        try:
            run = self._start_compose(target, inputs, method, "operator", force, finetune)
        except ComposeError as exc:
            raise ProtocolError(ErrorCode.BACKEND_ERROR, f"cannot compose: {exc}") from None
        except Exception as exc:
            raise ProtocolError(ErrorCode.BACKEND_ERROR,
                                f"composition failed: {type(exc).__name__}: {exc}") from None
        _ok(request, started=True, composition=run.composition)

    # --- live samples -------------------------------------------------------------------

    def _sample_frame(self, body: dict[str, Any]):
        """The frame a sample command names, with every sensor the buffer holds (stored
        whole, so that any encoder can train on it later)."""
        frame_id = _string(body, "frame_id", 128)
        held = self.frames.sensors_held()
        if not held:
            raise ProtocolError(ErrorCode.NO_FRAME, "no sensor frame received yet")
        return self.frames.frame(held, frame_id)

    def _sample_context(self, body: dict[str, Any], frame) -> str:
        """The data context the samples go to: the request's ``context``, else the policy's
        for the set it wants now, else the frame's light (night below the threshold)."""
        context = body.get("context")
        if context is None:
            context = self.selector.data_context(self.selector.desired())
        if context is None:
            context = "night" if frame.is_night else "day"
        try:
            self.samples.buffer(context)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"field 'context': {exc}") from None
        return context

    def _store_samples(self, request: Request, context: str, frame,
                       samples: list[LiveSample], **extra: Any) -> None:
        stored = None
        if samples:
            try:
                stored = self.samples.add(context, frame, samples)
            except OSError as exc:
                raise ProtocolError(ErrorCode.STORE_ERROR,
                                    f"cannot store the samples: {exc}") from None
        buffer = self.samples.buffer(context)
        _ok(request, context=context, frame_id=frame.frame_id, stored=len(samples),
            segment=stored.file if stored else None, buffered=len(buffer),
            samples=[{"question": s.question, "answer": s.answer, "source": s.source,
                      "confidence": s.confidence} for s in samples], **extra)

    def _teach(self, request: Request) -> None:
        """``teach``: an operator's question/answer pair about a held frame."""
        body = request.body
        _fields(body, {"frame_id", "question", "answer", "context"})
        question, answer = taught_pair(body, self.config.limits.max_question_chars)
        frame = self._sample_frame(body)
        context = self._sample_context(body, frame)
        sample = LiveSample(frame.frame_id, frame.timestamp, question, answer, "taught")
        self._store_samples(request, context, frame, [sample])

    def _objects(self, request: Request) -> None:
        """``objects``: the perception stack's object list for a held frame, turned into
        template questions answered from it."""
        body = request.body
        settings = self.config.samples
        _fields(body, {"frame_id", "objects", "questions_per_frame", "context"})
        objects = parse_objects(body.get("objects"), settings.max_objects)
        count = question_count(body, settings.questions_per_frame, settings.max_questions)
        frame = self._sample_frame(body)
        context = self._sample_context(body, frame)
        samples = object_samples(frame, objects, self._balancer, count)
        self._store_samples(request, context, frame, samples, objects=len(objects))

    def _pseudo_label(self, request: Request) -> None:
        """``pseudo_label``: the serving state answers template questions about a held frame;
        the answers are stored (with their confidence) as samples of ``context`` — e.g. the
        camera state at dusk teaching the LiDAR student of the night."""
        body = request.body
        settings = self.config.samples
        _fields(body, {"frame_id", "questions_per_frame", "min_confidence", "context"})
        count = question_count(body, settings.questions_per_frame, settings.max_questions)
        floor = body.get("min_confidence", 0.0)
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) \
                or not 0.0 <= floor <= 1.0:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                "field 'min_confidence' must be a number in 0..1")
        frame = self._sample_frame(body)
        context = self._sample_context(body, frame)
        samples, dropped, measured = self._teacher_samples(frame, count, float(floor))
        self._store_samples(request, context, frame, samples,
                            teacher={"modalities": sorted(self.serving),
                                     "generation": self.serving_generation},
                            dropped=dropped, confidence_measured=measured)

    def _teacher_samples(self, frame, count: int, floor: float
                         ) -> tuple[list[LiveSample], int, bool]:
        """The serving state's answers to ``count`` scene-free template questions about
        ``frame`` as ``pseudo`` samples: (kept samples, dropped under ``floor``, whether the
        confidences were measured)."""
        missing = sorted(self.serving - set(frame.sensors))
        if missing:
            raise ProtocolError(ErrorCode.NO_FRAME, f"frame {frame.frame_id!r} lacks the "
                                f"serving state's sensors {missing}")
        questions = scene_free_questions(self._question_rng, count)
        texts = [c.question for c in questions]
        with_confidence = getattr(self.backend, "answer_with_confidence", None)
        try:
            if callable(with_confidence):
                answers, confidences = with_confidence(texts, [frame] * len(texts),
                                                       self.serving)
                measured = True
            else:
                answers = self.backend.answer(texts, [frame] * len(texts), self.serving)
                confidences, measured = [1.0] * len(texts), False
        except Exception as exc:
            raise ProtocolError(ErrorCode.BACKEND_ERROR,
                                f"the teacher could not answer: {type(exc).__name__}: {exc}"
                                ) from None
        labelled = [Candidate(c.question, str(a).strip().lower(), c.template_type, c.num_hop)
                    for c, a in zip(questions, answers)]
        kept = [i for i, conf in enumerate(confidences) if conf >= floor]
        samples = samples_from_candidates(frame, [labelled[i] for i in kept], "pseudo",
                                          [min(max(float(confidences[i]), 0.0), 1.0)
                                           for i in kept])
        return samples, len(texts) - len(kept), measured

    def _auto_pseudo_label(self) -> None:
        """``[samples] pseudo_label_every_s``: the serving state labels the newest frame
        (once per frame) into ``pseudo_label_context``, when nothing else waits."""
        settings = self.config.samples
        now = time.monotonic()
        if (settings.pseudo_label_every_s <= 0 or now < self._next_pseudo
                or self.adaptation.active or not self._inbox.empty()):
            return
        self._next_pseudo = now + settings.pseudo_label_every_s
        held = self.frames.sensors_held()
        if not self.serving <= held:
            return
        frame = self.frames.frame(held)
        key = (frame.frame_id, frame.timestamp)
        if key == self._last_pseudo:
            return
        self._last_pseudo = key
        try:
            samples, dropped, _ = self._teacher_samples(frame, settings.questions_per_frame,
                                                        settings.pseudo_label_min_confidence)
            if samples:
                self.samples.add(settings.pseudo_label_context, frame, samples)
        except (ProtocolError, OSError) as exc:
            log.warning("pseudo-labelling frame %s failed: %s", frame.frame_id,
                        getattr(exc, "message", exc))
            return
        log.debug("pseudo-labelled frame %s: %d samples into %r, %d under the confidence "
                  "floor", frame.frame_id, len(samples), settings.pseudo_label_context, dropped)

    # --- power --------------------------------------------------------------------------

    def _set_power_mode(self, request: Request) -> None:
        _fields(request.body, {"mode"})
        name = _string(request.body, "mode", 64)
        if self._pending_mode is not None:
            raise ProtocolError(ErrorCode.CONFLICT,
                                f"a change to {self._pending_mode[0].target} is pending")
        change = self.monitor.request_mode(name)  # type: ignore[arg-type]
        if change.done:
            self._mode_change_done(change, request)
        else:
            self._pending_mode = (change, request)

    def _mode_change_done(self, change: ModeChange, request: Request) -> None:
        if change.status in (ModeChangeStatus.APPLIED, ModeChangeStatus.NEEDS_REBOOT):
            _ok(request, **change.to_dict())
            self._poll_power(force=True)
        else:
            self._error(request, ErrorCode.POWER_ERROR,
                        f"power mode {change.target}: {change.status.value} {change.message}")

    def _poll_power(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._pending_mode is not None:
            change = self.monitor.poll_mode_change()
            if change is not None:
                _, request = self._pending_mode
                self._pending_mode = None
                self._mode_change_done(change, request)
                force = True
        if not force and now < self._next_power_poll:
            return
        self._next_power_poll = now + self.config.power.poll_interval_s
        try:
            reading = self.monitor.read()
            mode = self.monitor.current_mode()
        except Exception as exc:
            log.warning("power monitor read failed: %s", exc)
            return
        self.last_reading = reading.to_dict()
        if reading.watts is not None:
            self.metrics.power_watts.set(reading.watts)
        if reading.gpu_mhz is not None:
            self.metrics.gpu_mhz.set(reading.gpu_mhz)
        name = mode.name if mode else None
        if name != self._last_mode:
            previous, self._last_mode = self._last_mode, name
            self.publish(EventType.POWER_MODE, {"mode": name, "previous": previous,
                                                "power_mode": mode.to_dict() if mode else None})
            if previous is not None:
                self._gave_up_on = None  # a new budget: an infeasible adaptation may fit now
                if self.adaptation.active:
                    budget = self._budget()
                    if budget is not None:
                        self.adaptation.replan(budget)

    def _budget(self):
        try:
            return self.monitor.budget(self.config.adaptation.deadline_s,
                                       self.config.power.flops_per_s)
        except (RuntimeError, ValueError) as exc:
            log.warning("no power budget: %s", exc)
            return None

    # --- policy and adaptation ----------------------------------------------------------

    def _update_policy(self) -> None:
        desired = self.selector.desired()
        if desired != self._last_desired:
            self.publish(EventType.CONTEXT_CHANGED, {"desired": sorted(desired),
                                                     "serving": sorted(self.serving),
                                                     "policy": self.selector.describe()})
            self._last_desired = desired
            self._gave_up_on = None
            self._no_compose_for = None
        run = self.adaptation.run
        if run is not None:
            if run.reason == "policy" and run.modalities != desired:
                self._after_run(self.adaptation.cancel(f"context now wants {sorted(desired)}"))
            else:
                return
        if desired == self.serving or desired == self._gave_up_on:
            return
        if not self.config.adaptation.auto and self.selector.mode == "auto":
            return
        if self._reconnect_from_store(desired):
            return
        if self._compose_for_policy(desired):
            return
        plan = self._start_run(desired, "policy", False)
        if plan is None or not plan.feasible:
            self._gave_up_on = desired

    def _reconnect_from_store(self, desired: frozenset[str]) -> bool:
        """Reconnect: a state adapted earlier for exactly this set is loaded, not retrained."""
        entry = self.store.latest_good_state(desired)
        if entry is None:
            return False
        try:
            self.backend.load_state(self.store.path(entry))
        except Exception as exc:
            log.error("could not load stored state %s: %s; adapting instead", entry.name, exc)
            return False
        previous, self.serving = self._serving, desired
        self.serving_generation = entry.generation
        self.publish(EventType.MODALITY_SWITCHED, {"modalities": sorted(desired),
                                                   "previous": sorted(previous),
                                                   "source": "store",
                                                   "generation": entry.generation})
        return True

    def _compose_inputs(self, modalities: frozenset[str]
                        ) -> tuple[list[ComposeInput], list[str]]:
        """The newest verified single-modality state of each of ``modalities`` (inputs in
        sorted modality order), and the modalities that have none."""
        inputs: list[ComposeInput] = []
        missing: list[str] = []
        for modality in sorted(modalities):
            entry = self.store.latest_good_state([modality])
            if entry is None:
                missing.append(modality)
            else:
                inputs.append(ComposeInput(entry.name, entry.generation, (modality,),
                                           self.store.path(entry)))
        return inputs, missing

    def _compose_for_policy(self, desired: frozenset[str]) -> bool:
        """Compose ``desired`` instead of adapting it, where configured and possible.

        Only for sets of two or more modalities whose every modality has a stored state of
        its own (no stored state for the set itself: Reconnect came first). A failure or a
        composed state that loses the gate leaves the set to a normal adaptation."""
        settings = self.config.adaptation
        if (settings.compose == "off" or len(desired) < 2 or desired == self._no_compose_for
                or not can_compose(self.backend)):
            return False
        inputs, missing = self._compose_inputs(desired)
        if missing:
            log.debug("cannot compose %s: no stored state for %s", sorted(desired), missing)
            return False
        try:
            self._start_compose(desired, inputs, settings.compose_method, "policy", False,
                                settings.compose == "finetune")
        except Exception:  # logged and published by the controller; adapt instead
            self._no_compose_for = desired
            return False
        return True

    def _start_compose(self, modalities: frozenset[str], inputs: list[ComposeInput],
                       method: str, reason: str, force: bool, finetune: bool):
        run = self.adaptation.start_compose(modalities, inputs, method,
                                            self.config.adaptation.compose_search_evals, reason,
                                            force, finetune)
        self.monitor.note_activity(True)
        return run

    def _start_run(self, modalities: frozenset[str], reason: str, force: bool,
                   finetune_of: int | None = None):
        budget = self._budget()
        if budget is None:
            return None
        plan = self.adaptation.start(modalities, budget, reason, force, finetune_of)
        if plan.feasible:
            self.monitor.note_activity(True)
        return plan

    def _after_run(self, result: dict[str, Any] | None) -> None:
        self.monitor.note_activity(False)
        if result is None:
            return
        if result.get("kind") == "compose":
            self._after_compose(result)
            return
        self.metrics.adaptations.inc(outcome=result["outcome"])
        modalities = frozenset(result["modalities"])
        if not result["committed"]:
            if result["outcome"] != "cancelled":
                self._gave_up_on = modalities
            return
        previous, self.serving = self._serving, modalities
        self._dirty = True
        meta = {"source": "adaptation", "n_blocks": result["n_blocks"],
                "steps": result["steps_done"], "accuracy": result["adapted_accuracy"]}
        if result.get("finetune_of") is not None:
            meta.update(source="finetune", finetuned_from=result["finetune_of"])
        self._save_serving(meta)
        self.publish(EventType.MODALITY_SWITCHED, {"modalities": sorted(modalities),
                                                   "previous": sorted(previous),
                                                   "source": "adaptation",
                                                   "generation": self.serving_generation})

    def _after_compose(self, result: dict[str, Any]) -> None:
        """A composition run ended: serve and store a composed state that won the gate
        (provenance in its store meta), then fine-tune from it if the run asks to."""
        self.metrics.compositions.inc(outcome=result["outcome"])
        modalities = frozenset(result["modalities"])
        if not result["committed"]:
            if result["outcome"] != "cancelled":
                self._no_compose_for = modalities  # the policy adapts this set instead
            return
        previous, self.serving = self._serving, modalities
        self._dirty = True
        provenance = {**(result.get("composition") or {}),
                      "time_to_decision_s": result.get("time_to_decision_s"),
                      "composed_accuracy": result["adapted_accuracy"],
                      "serving_accuracy": result["serving_accuracy"]}
        self._save_serving({"source": "composition", "n_blocks": result["n_blocks"],
                            "steps": 0, "accuracy": result["adapted_accuracy"],
                            "composition": provenance})
        self.publish(EventType.MODALITY_SWITCHED, {"modalities": sorted(modalities),
                                                   "previous": sorted(previous),
                                                   "source": "composition",
                                                   "generation": self.serving_generation})
        if not result.get("finetune"):
            return
        plan = self._start_run(modalities, result["reason"], False,
                               finetune_of=self.serving_generation)
        if plan is None or not plan.feasible:
            log.info("no fine-tuning of the composed %s: %s", sorted(modalities),
                     plan.reason if plan else "no power budget available")

    def _save_serving(self, meta: dict[str, Any]) -> None:
        generation = self.adaptation.save_serving(self.serving, meta)
        if generation is not None:
            self.serving_generation = generation
            self._dirty = False

    # --- status -------------------------------------------------------------------------

    def _adaptation_cost(self) -> dict[str, Any] | None:
        """Measured figures of the running/last run, when the backend reports them."""
        report = getattr(self.backend, "progress_report", None)
        try:
            return report() if callable(report) else None
        except Exception:  # status must always answer
            log.exception("backend progress report failed")
            return None

    def _serving_provenance(self) -> dict[str, Any]:
        """Where the serving state came from, read from its store entry's meta: ``source``
        (``initial``, ``adaptation``, ``composition``, ``finetune``), the ``composition``
        provenance of a composed state and ``finetuned_from`` of a fine-tuned one."""
        entry = next((e for e in self.store.states()
                      if e.generation == self.serving_generation), None)
        meta = entry.meta if entry is not None else {}
        return {"source": meta.get("source"), "composition": meta.get("composition"),
                "finetuned_from": meta.get("finetuned_from")}

    def status(self) -> dict[str, Any]:
        m = self.metrics
        mode = self.monitor.current_mode()
        decisions = list(self.adaptation.planner.decisions)[-10:]
        return {
            "protocol": PROTOCOL_VERSION,
            "uptime_s": time.monotonic() - self.started_at,
            "serving": {"modalities": sorted(self.serving), "generation": self.serving_generation,
                        **self._serving_provenance()},
            "desired": sorted(self.selector.desired()),
            "policy": self.selector.describe(),
            "adaptation": self.adaptation.run.describe() if self.adaptation.run else None,
            "last_adaptation": self.adaptation.last_result,
            "last_composition": self.adaptation.last_composition,
            "power": {
                "monitor": self.monitor.name,
                "mode": mode.to_dict() if mode else None,
                "modes": [x.name for x in self.monitor.modes()],
                "reading": self.last_reading,
                "pending_change": self._pending_mode[0].to_dict() if self._pending_mode else None,
            },
            "budget": {"last": decisions[-1].to_dict() if decisions else None,
                       "decisions": [d.to_dict() for d in decisions]},
            "counters": {
                "frames_in": m.frames_in.by_label("sensor"),
                "frames_dropped": m.frames_dropped.by_label("reason"),
                "queries": m.queries.total(),
                "errors": m.errors.by_label("code"),
                "clock_resets": m.clock_resets.by_label("sensor"),
            },
            "queue": {"pending": len(self._inbox), "clients": self._inbox.clients(),
                      "max_pending": self._inbox.max_total,
                      "max_per_client": self._inbox.max_per_client},
            "latency": m.query_latency.summary(),
            "adaptation_cost": self._adaptation_cost(),
            "frames": self.frames.describe(),
            "samples": self.samples.describe(),
            "store": {"root": str(self.store.root), "entries": len(self.store.entries())},
        }
