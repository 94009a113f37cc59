"""The nuScenes-QA answer vocabulary, question types and exact-match answer normalisation."""

from __future__ import annotations

import re

#: The 30 answers of nuScenes-QA (the answer space the mPnP-LLM paper evaluates on).
ANSWER_VOCAB: tuple[str, ...] = (
    *(str(i) for i in range(11)),
    "yes",
    "no",
    "barrier",
    "bicycle",
    "bus",
    "car",
    "construction vehicle",
    "motorcycle",
    "pedestrian",
    "traffic cone",
    "trailer",
    "truck",
    "moving",
    "not standing",
    "parked",
    "standing",
    "stopped",
    "with rider",
    "without rider",
)

#: nuScenes-QA template types.
QUESTION_TYPES: tuple[str, ...] = ("exist", "count", "object", "status", "comparison")

_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_SYNONYMS = {
    "cars": "car",
    "trucks": "truck",
    "buses": "bus",
    "trailers": "trailer",
    "barriers": "barrier",
    "bicycles": "bicycle",
    "motorcycles": "motorcycle",
    "pedestrians": "pedestrian",
    "traffic cones": "traffic cone",
    "construction vehicles": "construction vehicle",
    "true": "yes",
    "false": "no",
}
_PUNCT = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Normalise a generated or reference answer for exact-match accuracy.

    Lower-cases, keeps only the first line, drops punctuation and a leading ``answer:``,
    collapses whitespace, maps number words to digits and plurals to the vocabulary's
    singular. The result is compared verbatim; it is *not* snapped to the vocabulary,
    so an answer outside it simply counts as wrong.
    """
    text = text.strip().lower().split("\n", 1)[0]
    text = _PUNCT.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    if text.startswith("answer "):
        text = text[len("answer ") :]
    if text.startswith("the "):
        text = text[len("the ") :]
    text = _NUMBER_WORDS.get(text, text)
    return _SYNONYMS.get(text, text)


def exact_match(prediction: str, reference: str) -> bool:
    """Whether two answers agree after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)
