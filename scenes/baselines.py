"""Blind baselines: how far the questions alone get, without looking at any sensor.

* majority per question type: answer every question of a template with the most frequent
  training answer of that template;
* question-only: a multinomial naive-Bayes bag-of-words (unigrams + bigrams) classifier from
  question text to answer, trained on train and evaluated on test.

A good dataset keeps both low (near 1/2 for yes/no, near 1/k for k balanced answers).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from mpnp.answers import QUESTION_TYPES
from scenes.sample import QAItem

_TOKEN = re.compile(r"[a-z0-9]+")


@dataclass
class Accuracy:
    """Exact-match accuracy overall and per template type."""

    overall: float
    per_type: dict[str, float]
    count: int

    def as_row(self) -> str:
        cells = " ".join(f"{t}={self.per_type.get(t, float('nan')):.3f}" for t in QUESTION_TYPES)
        return f"overall={self.overall:.3f} {cells} (n={self.count})"


def accuracy(items: list[QAItem], predictions: list[str]) -> Accuracy:
    if len(items) != len(predictions):
        raise ValueError("items and predictions differ in length")
    hits: dict[str, list[bool]] = defaultdict(list)
    for item, pred in zip(items, predictions):
        hits[item.template_type].append(pred == item.answer)
    total = [h for group in hits.values() for h in group]
    return Accuracy(float(np.mean(total)) if total else float("nan"),
                    {t: float(np.mean(v)) for t, v in hits.items()}, len(total))


def majority_baseline(train: list[QAItem], test: list[QAItem]) -> Accuracy:
    """Accuracy of answering each template with its most frequent training answer."""
    if not train:
        raise ValueError("majority baseline needs training questions")
    by_type: dict[str, Counter] = defaultdict(Counter)
    for item in train:
        by_type[item.template_type][item.answer] += 1
    overall = Counter(item.answer for item in train).most_common(1)[0][0]
    preds = [by_type[q.template_type].most_common(1)[0][0] if q.template_type in by_type
             else overall for q in test]
    return accuracy(test, preds)


def _features(question: str, template_type: str) -> list[str]:
    words = _TOKEN.findall(question.lower())
    return [f"t:{template_type}", *words, *(f"{a}_{b}" for a, b in zip(words, words[1:]))]


class QuestionOnlyModel:
    """Multinomial naive Bayes over question words and bigrams (+ the template type)."""

    def __init__(self, smoothing: float = 0.5):
        if smoothing <= 0:
            raise ValueError("smoothing must be > 0")
        self.smoothing = smoothing

    def fit(self, items: list[QAItem]) -> QuestionOnlyModel:
        if not items:
            raise ValueError("question-only model needs training questions")
        self.answers = sorted({q.answer for q in items})
        vocab: dict[str, int] = {}
        rows = []
        for q in items:
            feats = [vocab.setdefault(f, len(vocab)) for f in _features(q.question,
                                                                        q.template_type)]
            rows.append(feats)
        self.vocab = vocab
        ans_index = {a: i for i, a in enumerate(self.answers)}
        counts = np.zeros((len(self.answers), len(vocab)))
        prior = np.zeros(len(self.answers))
        for q, feats in zip(items, rows):
            a = ans_index[q.answer]
            prior[a] += 1
            np.add.at(counts[a], feats, 1.0)
        counts += self.smoothing
        self.log_likelihood = np.log(counts / counts.sum(axis=1, keepdims=True))
        self.log_prior = np.log(prior / prior.sum())
        # Answers only ever seen with one template are only allowed for that template.
        self.allowed: dict[str, np.ndarray] = {}
        for t in {q.template_type for q in items}:
            seen = {q.answer for q in items if q.template_type == t}
            self.allowed[t] = np.array([a in seen for a in self.answers])
        return self

    def predict(self, items: list[QAItem]) -> list[str]:
        out = []
        for q in items:
            feats = [self.vocab[f] for f in _features(q.question, q.template_type)
                     if f in self.vocab]
            score = self.log_prior + self.log_likelihood[:, feats].sum(axis=1)
            allowed = self.allowed.get(q.template_type)
            if allowed is not None:
                score = np.where(allowed, score, -np.inf)
            out.append(self.answers[int(np.argmax(score))])
        return out


def question_only_baseline(train: list[QAItem], test: list[QAItem]) -> Accuracy:
    model = QuestionOnlyModel().fit(train)
    return accuracy(test, model.predict(test))


def answer_distribution(items: list[QAItem]) -> dict[str, Counter]:
    """Answer counts per template type."""
    out: dict[str, Counter] = defaultdict(Counter)
    for q in items:
        out[q.template_type][q.answer] += 1
    return dict(out)
