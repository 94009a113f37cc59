"""Replay: a recording's sensor messages (and questions) into a daemon.

Each sensor message is first decoded with the protocol's own decoder
(:func:`daemon.protocol.decode_sensor_message`, under the daemon's limits): what it would
refuse is not sent, but named (one line per reason) and counted. Timing follows the recorded
receive times, divided by ``rate`` (``None``: as fast as the daemon takes them; sends wait
for room in the ingest queue instead of dropping). Questions of the recording are asked
again about the frame that answered them (the recorded reply's ``frame_id``) and the answers
compared; a question is asked when the stream reaches it, and waits for its answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from daemon.config import LimitsConfig
from daemon.protocol import IngestError, decode_sensor_message
from recording.reader import Item

log = logging.getLogger(__name__)

#: How long a replayed question retries ``frame_not_found`` (its frame may still be on the
#: way: sensor messages and questions travel on different sockets).
FRAME_WAIT_S = 3.0


@dataclass
class ReplayResult:
    sensor_sent: int = 0
    sensor_dropped: int = 0  # the daemon's queue stayed full past the send timeout
    refused: dict[str, int] = field(default_factory=dict)  # drop reason -> count
    questions: int = 0
    same_answers: int = 0
    different: list[dict[str, Any]] = field(default_factory=list)
    question_errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    recorded_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def summary(self) -> str:
        refused = sum(self.refused.values())
        lines = [f"sent {self.sensor_sent} sensor messages ({refused} refused by the protocol, "
                 f"not sent{': ' + _counts(self.refused) if refused else ''}; "
                 f"{self.sensor_dropped} dropped: daemon not reading) in {self.wall_s:.1f} s "
                 f"of a {self.recorded_s:.1f} s recording"]
        if self.questions:
            lines.append(f"asked {self.questions} recorded questions: {self.same_answers} same "
                         f"answers, {len(self.different)} different"
                         + (f", errors {_counts(self.question_errors)}"
                            if self.question_errors else ""))
        return "\n".join(lines)


def _counts(values: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(values.items()))


def replay(
    items: Iterable[Item],
    send: Callable[[list[Any]], bool],
    ask: Callable[[str, str | None], dict[str, Any]] | None = None,
    rate: float | None = 1.0,
    limits: LimitsConfig | None = None,
    notice: Callable[[str], None] = log.warning,
) -> ReplayResult:
    """Play ``items`` (a :class:`~recording.reader.RecordingReader`, say).

    Args:
        send: sends one wire message; ``False`` when it could not be delivered.
        ask: asks a question (``question, frame_id``) and returns the reply body, raising
            :class:`daemon.client.DaemonError` for an error reply; ``None``: no questions.
        rate: 1.0 real time, N faster, ``None`` as fast as possible.
        limits: the daemon's limits the messages are checked against (default: the
            defaults').
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"replay rate must be > 0 (or max), got {rate}")
    limits = limits or LimitsConfig()
    result = ResultTracker(notice)
    started = time.monotonic()
    first: int | None = None
    last = 0
    for item in items:
        if first is None:
            first = item.log_time_ns
        last = item.log_time_ns
        if rate is not None:
            due = started + (item.log_time_ns - first) / 1e9 / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        if item.kind == "sensor":
            result.sensor(item, send, limits)
        elif item.kind == "request" and ask is not None:
            result.question(item, ask)
    result.value.wall_s = time.monotonic() - started
    result.value.recorded_s = 0.0 if first is None else (last - first) / 1e9
    return result.value


class ResultTracker:
    """Counts what the replay did and names each kind of problem once."""

    def __init__(self, notice: Callable[[str], None]) -> None:
        self.value = ReplayResult()
        self.notice = notice

    def sensor(self, item: Item, send: Callable[[list[Any]], bool],
               limits: LimitsConfig) -> None:
        assert item.parts is not None
        try:
            decode_sensor_message(item.parts, limits)
        except IngestError as exc:
            reason = exc.reason.value
            n = self.value.refused.get(reason, 0) + 1
            self.value.refused[reason] = n
            if n == 1:
                self.notice(f"not sent ({reason}, the protocol refuses it): {item.topic} "
                            f"message at {item.log_time_ns / 1e9:.3f}: {exc}")
            return
        if send(item.parts):
            self.value.sensor_sent += 1
        else:
            self.value.sensor_dropped += 1
            if self.value.sensor_dropped == 1:
                self.notice("a sensor message could not be sent: the daemon's ingest queue "
                            "stayed full (is the daemon running?)")

    def question(self, item: Item, ask: Callable[[str, str | None], dict[str, Any]]) -> None:
        from daemon.client import DaemonError, DaemonTimeout

        body = item.body or {}
        if body.get("type") != "query" or body.get("status") != "ok":
            return
        request, recorded = body.get("request") or {}, body.get("reply") or {}
        question = request.get("question")
        if not isinstance(question, str):
            return
        frame_id = recorded.get("frame_id") or request.get("frame_id")
        self.value.questions += 1
        deadline = time.monotonic() + FRAME_WAIT_S
        while True:
            try:
                reply = ask(question, frame_id)
                break
            except DaemonError as exc:
                if exc.code in ("frame_not_found", "no_frame") and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                self._question_error(exc.code, f"{question!r} about {frame_id}: {exc}")
                return
            except DaemonTimeout as exc:
                self._question_error("timeout", f"{question!r}: {exc}")
                return
        if reply.get("answer") == recorded.get("answer"):
            self.value.same_answers += 1
        else:
            self.value.different.append({"question": question, "frame_id": frame_id,
                                         "recorded": recorded.get("answer"),
                                         "replayed": reply.get("answer")})

    def _question_error(self, code: str, line: str) -> None:
        n = self.value.question_errors.get(code, 0) + 1
        self.value.question_errors[code] = n
        if n == 1:
            self.notice(f"question failed ({code}): {line}")


def parse_rate(text: str) -> float | None:
    """``--rate``: ``max`` (as fast as possible), or a factor: ``1``, ``4``, ``2x``, ``0.5``."""
    value = text.strip().lower()
    if value in ("max", "fast", "0"):
        return None
    try:
        rate = float(value.removesuffix("x"))
    except ValueError:
        raise ValueError(f"--rate must be a factor (1, 4, 0.5) or max, got {text!r}") from None
    if rate <= 0:
        raise ValueError(f"--rate must be > 0 or max, got {text!r}")
    return rate
