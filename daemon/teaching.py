"""Live samples from what a robot stack can provide: its perception stack's object lists,
an operator's question/answer pairs, a trusted serving state's answers (pseudo-labels).

Pure functions over request bodies, used by the engine's ``teach``, ``objects`` and
``pseudo_label`` handlers; every bad input raises a ``bad_request``
:class:`~daemon.protocol.ProtocolError` naming its field. Questions are the project's
templates (:mod:`scenes.questions`): an object list becomes a scene graph, its candidate
pool, then a balanced pick (:class:`~scenes.questions.AnswerBalancer`) — the same path as
the synthetic world's questions.

The object schema (``PROTOCOL.md``, Live samples) follows the nuScenes annotation: the
category is one of the world's class names (nuScenes' ``category_name`` without its
``vehicle.`` / ``human.pedestrian.`` prefix), ``status`` is the attribute (``moving``,
``parked``, ``with rider``, ...), the box is its centre ``x, y, z`` in the ego frame
(x forward, y left, z up; metres), ``length, width, height`` (metres) and ``yaw``
(radians about z) — nuScenes' ``translation``, ``size`` and ``rotation`` in the ego frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from daemon.protocol import ErrorCode, ProtocolError
from daemon.samples import LiveSample
from scenes import layout
from scenes.questions import AnswerBalancer, Candidate, candidate_pool
from scenes.sample import Frame, ObjectAnnotation

OBJECT_FIELDS = ("class", "status", "x", "y", "z", "length", "width", "height", "yaw")
#: Largest coordinate (m) and box side (m) accepted: beyond any sensor's range / any object.
MAX_COORDINATE_M = 1000.0
MAX_SIDE_M = 100.0
MAX_ANSWER_CHARS = 64


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"field {where!r} must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise _bad(f"field {where!r} does not fit a float") from None
    if not math.isfinite(number):
        raise _bad(f"field {where!r} must be finite")
    return number


def parse_objects(value: Any, max_objects: int) -> list[ObjectAnnotation]:
    """The ``objects`` field: a list of boxes → :class:`ObjectAnnotation` s."""
    if not isinstance(value, list):
        raise _bad("field 'objects' must be a list of objects (an empty list: nothing seen)")
    if len(value) > max_objects:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"field 'objects' lists {len(value)} "
                            f"objects (limit {max_objects})")
    out = []
    for i, entry in enumerate(value):
        where = f"objects[{i}]"
        if not isinstance(entry, dict):
            raise _bad(f"field {where!r} must be an object")
        unknown = sorted(set(entry) - set(OBJECT_FIELDS) - {"id"})
        if unknown:
            raise _bad(f"field {where!r} has unknown keys {unknown}; allowed: "
                       f"{list(OBJECT_FIELDS)} and 'id'")
        category = entry.get("class")
        if category not in layout.CLASSES:
            raise _bad(f"field '{where}.class' must be one of {list(layout.CLASS_NAMES)}, "
                       f"got {str(category)[:40]!r}")
        statuses = layout.CLASSES[category].statuses
        status = entry.get("status")
        if status is not None and status not in statuses:
            raise _bad(f"field '{where}.status' of a {category} must be one of "
                       f"{list(statuses)} or null, got {str(status)[:40]!r}")
        if status is None and statuses:
            raise _bad(f"field '{where}.status' is required for a {category} (one of "
                       f"{list(statuses)})")
        numbers = {}
        for name in OBJECT_FIELDS[2:]:
            if name not in entry:
                raise _bad(f"field '{where}.{name}' is required")
            numbers[name] = _number(entry[name], f"{where}.{name}")
        for name in ("x", "y", "z"):
            if abs(numbers[name]) > MAX_COORDINATE_M:
                raise _bad(f"field '{where}.{name}' must be within ±{MAX_COORDINATE_M:g} m")
        for name in ("length", "width", "height"):
            if not 0.0 < numbers[name] <= MAX_SIDE_M:
                raise _bad(f"field '{where}.{name}' must be in (0, {MAX_SIDE_M:g}] m")
        out.append(ObjectAnnotation(
            category, (numbers["x"], numbers["y"], numbers["z"]),
            (numbers["width"], numbers["length"], numbers["height"]), numbers["yaw"], status))
    return out


def objects_to_wire(objects: Sequence[ObjectAnnotation] | None) -> list[dict[str, Any]]:
    """Objects in the ``objects`` command's schema (the inverse of :func:`parse_objects`):
    what a simulated perception stack with the world's ground truth sends."""
    out = []
    for o in objects or []:
        width, length, height = o.size
        out.append({"class": o.category, "status": o.status, "x": float(o.center[0]),
                    "y": float(o.center[1]), "z": float(o.center[2]), "length": float(length),
                    "width": float(width), "height": float(height), "yaw": float(o.yaw)})
    return out


def question_count(body: dict[str, Any], default: int, maximum: int) -> int:
    """The optional ``questions_per_frame`` field."""
    value = body.get("questions_per_frame", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise _bad(f"field 'questions_per_frame' must be an integer in 1..{maximum}")
    return value


def samples_from_candidates(frame: Frame, picked: Sequence[Candidate], source: str,
                            confidences: Sequence[float] | None = None) -> list[LiveSample]:
    return [LiveSample(frame.frame_id, frame.timestamp, c.question, c.answer, source,
                       1.0 if confidences is None else float(confidences[i]),
                       c.template_type, c.num_hop)
            for i, c in enumerate(picked)]


def object_samples(frame: Frame, objects: list[ObjectAnnotation], balancer: AnswerBalancer,
                   count: int) -> list[LiveSample]:
    """Up to ``count`` balanced template questions about ``objects``, answered from them."""
    picked = balancer.pick(candidate_pool(objects), count)
    return samples_from_candidates(frame, picked, "objects")


def scene_free_questions(rng: np.random.Generator, count: int) -> list[Candidate]:
    """``count`` distinct template questions that any scene can answer (0-hop ``exist`` and
    ``count``): what a teacher is asked when no object list says what is there. Their
    answers here are those of an empty scene and are never used."""
    pool = [c for c in candidate_pool([]) if c.template_type in ("exist", "count")]
    order = rng.permutation(len(pool))[:count]
    return [pool[i] for i in sorted(order)]


def taught_pair(body: dict[str, Any], max_question_chars: int) -> tuple[str, str]:
    """The ``question`` and ``answer`` fields of ``teach``."""
    question = body.get("question")
    if not isinstance(question, str) or not question.strip() \
            or len(question) > max_question_chars:
        raise _bad(f"field 'question' must be a non-empty string of <= {max_question_chars} "
                   "chars")
    answer = body.get("answer")
    if not isinstance(answer, str) or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        raise _bad(f"field 'answer' must be a non-empty string of <= {MAX_ANSWER_CHARS} chars")
    return question.strip(), answer.strip().lower()
