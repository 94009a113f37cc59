"""Exact-match accuracy of a connector: overall, per question type, per type × hop.

Answers are normalised the same way on both sides (:func:`mpnp.answers.normalize_answer`).
The majority answer per question type (from the training split) is the floor every
accuracy is read against.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from adapt.connectors.base import Connector
from adapt.features import FeatureSet
from mpnp.answers import exact_match
from scenes.sample import QAItem

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Accuracy in 0..1; ``per_type_hop`` keys look like ``"count/1"``."""

    accuracy: float
    count: int
    per_type: dict[str, float] = field(default_factory=dict)
    per_type_hop: dict[str, float] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)

    @property
    def ci95(self) -> tuple[float, float]:
        """95 % Wilson interval of :attr:`accuracy` over :attr:`count` questions."""
        return wilson_interval(self.accuracy, self.count)

    def to_dict(self, with_predictions: bool = False) -> dict:
        out = {"accuracy": self.accuracy, "count": self.count, "ci95": list(self.ci95),
               "per_type": self.per_type, "per_type_hop": self.per_type_hop}
        if with_predictions:
            out["predictions"] = self.predictions
        return out


def wilson_interval(accuracy: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default); ``(nan, nan)`` for no
    questions. Unlike accuracy ± 1.96·SE it stays inside [0, 1] near 0 % and 100 %."""
    if count <= 0 or math.isnan(accuracy):
        return (float("nan"), float("nan"))
    denom = 1 + z * z / count
    centre = (accuracy + z * z / (2 * count)) / denom
    half = z * math.sqrt(accuracy * (1 - accuracy) / count + z * z / (4 * count * count)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def score(items: Sequence[QAItem], predictions: Sequence[str]) -> EvalResult:
    """Exact-match accuracy of ``predictions`` against ``items``' answers."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    hits: dict[str, list[bool]] = defaultdict(list)
    hop_hits: dict[str, list[bool]] = defaultdict(list)
    correct = []
    for item, pred in zip(items, predictions):
        ok = exact_match(pred, item.answer)
        correct.append(ok)
        hits[item.template_type].append(ok)
        hop_hits[f"{item.template_type}/{item.num_hop}"].append(ok)

    def mean(xs: list[bool]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return EvalResult(
        accuracy=mean(correct),
        count=len(correct),
        per_type={k: mean(v) for k, v in sorted(hits.items())},
        per_type_hop={k: mean(v) for k, v in sorted(hop_hits.items())},
        predictions=list(predictions),
    )


class ChunkedValidation:
    """Exact-match validation of ``connector`` on ``data`` in bounded chunks.

    :meth:`step` answers the next ``chunk`` items (True once all are done); :meth:`run`
    finishes whatever is left and returns the :class:`EvalResult`. The trainer's
    per-epoch validation and the daemon's baseline/candidate validation are both this.
    """

    def __init__(self, connector: Connector, data: FeatureSet, chunk: int = 32,
                 modalities: Sequence[str] | None = None) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.connector = connector
        self.data = data
        self.chunk = chunk
        self.modalities = connector.modality_names if modalities is None else list(modalities)
        self.predictions: list[str] = []
        self._result: EvalResult | None = None

    @property
    def done(self) -> bool:
        return len(self.predictions) >= len(self.data)

    @torch.no_grad()
    def step(self) -> bool:
        """Answer the next chunk; True when the whole split is answered."""
        if not self.done:
            start = len(self.predictions)
            batch = self.data.batch(range(start, min(start + self.chunk, len(self.data))),
                                    self.modalities)
            was_training = self.connector.training
            self.connector.eval()
            try:
                self.predictions.extend(self.connector.answer(batch.questions, batch.tokens))
            finally:
                self.connector.train(was_training)
        return self.done

    def run(self) -> EvalResult:
        while not self.step():
            pass
        if self._result is None:
            self._result = score(self.data.items, self.predictions)
        return self._result


def evaluate(connector: Connector, data: FeatureSet, *, batch_size: int = 32,
             modalities: Sequence[str] | None = None) -> EvalResult:
    """Greedy answers of ``connector`` on every item of ``data``, scored by exact match."""
    return ChunkedValidation(connector, data, batch_size, modalities).run()


@dataclass
class Grounding:
    """How much a model's answers depend on the frame it is asked about.

    Attributes:
        accuracy: with each question's own frame.
        swapped_accuracy: with another frame's tokens (:meth:`FeatureSet.with_swapped_frames`).
        changed: fraction of questions whose answer changes when the frame is swapped.
        count: questions.
    """

    accuracy: float
    swapped_accuracy: float
    changed: float
    count: int

    @property
    def reads(self) -> float:
        """Accuracy lost without the right frame: ≈ 0 for a model that ignores its sensors."""
        return self.accuracy - self.swapped_accuracy

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "swapped_accuracy": self.swapped_accuracy,
                "reads": self.reads, "changed": self.changed, "count": self.count,
                "ci95": list(wilson_interval(self.accuracy, self.count)),
                "swapped_ci95": list(wilson_interval(self.swapped_accuracy, self.count))}


def grounding(connector: Connector, data: FeatureSet, *, batch_size: int = 32,
              seed: int = 0, own: EvalResult | None = None) -> Grounding:
    """Evaluate ``connector`` on ``data`` as it is and with the frames swapped.

    The question-only prior survives the swap, reading does not — so this separates "the
    sensors help" from "the adapted model learned the answer prior" on the same questions,
    which an accuracy beside a question-only baseline cannot. ``own``: an evaluation of
    ``data`` already done (saves one pass).
    """
    own = own if own is not None else evaluate(connector, data, batch_size=batch_size)
    swapped = evaluate(connector, data.with_swapped_frames(seed), batch_size=batch_size)
    changed = sum(a != b for a, b in zip(own.predictions, swapped.predictions))
    return Grounding(own.accuracy, swapped.accuracy, changed / max(len(data), 1), len(data))


def majority_answers(train: Sequence[QAItem]) -> dict[str, str]:
    """The most frequent training answer of each question type."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for item in train:
        by_type[item.template_type][item.answer] += 1
    return {t: c.most_common(1)[0][0] for t, c in by_type.items()}


def majority_baseline(train: Sequence[QAItem], test: Sequence[QAItem]) -> EvalResult:
    """Accuracy of answering every question with its type's majority training answer."""
    answers = majority_answers(train)
    fallback = Counter(it.answer for it in train).most_common(1)[0][0] if train else ""
    return score(test, [answers.get(it.template_type, fallback) for it in test])
