"""``mpnp bench reader``: the small question-conditioned reader learns to read tokens that hold
the answer, loses it on swapped frames, and its control without tokens cannot (the run on a
world is CI's ``--quick`` benchmark)."""

from __future__ import annotations

import pytest
import torch

from adapt.features import FeatureSet
from bench.reader import (
    NO_TOKENS,
    ReaderConfig,
    question_words,
    score_reader,
    to_markdown,
    train_reader,
)
from scenes.sample import QAItem

COLOURS = ("red", "green", "blue", "white")


def _colour_world(frames: int, seed: int) -> FeatureSet:
    """Each frame: 6 tokens, token k one-hot of the colour of thing k; questions ask for one
    thing's colour, so only a model that picks the right token and reads it can answer."""
    g = torch.Generator().manual_seed(seed)
    items, tokens = [], {}
    for f in range(frames):
        colours = torch.randint(0, len(COLOURS), (6,), generator=g)
        tokens[f"f{seed}-{f}"] = torch.nn.functional.one_hot(colours, 8).float() * 3.0
        for k in range(6):
            items.append(QAItem(f"f{seed}-{f}", f"What colour is thing {k}?",
                                COLOURS[int(colours[k])], "object", 0))
    return FeatureSet(items, {"cam": tokens})


def test_question_words_are_lower_case_words_and_numbers():
    assert question_words("How many parked cars are there? 3") == [
        "how", "many", "parked", "cars", "are", "there", "3"]


def test_reader_reads_tokens_that_hold_the_answer_and_loses_them_on_swapped_frames():
    cfg = ReaderConfig(width=32, layers=2, heads=2, epochs=30, batch_size=32, lr=3e-3)
    train, val = _colour_world(120, seed=0), _colour_world(40, seed=1)
    model, fit = train_reader(train, "cam", cfg, progress=False)
    assert fit["losses"][-1] < fit["losses"][0]
    res = score_reader(model, val, "cam")
    assert res["accuracy"] > 0.9, res
    assert res["reads"] > 0.5 and res["swapped_accuracy"] < 0.5
    blind, _ = train_reader(train, "cam", cfg, zero_tokens=True, progress=False)
    control = score_reader(blind, val, "cam", zero_tokens=True)
    assert control["accuracy"] < 0.45 and "reads" not in control


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="multiple of heads"):
        ReaderConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="no tokens to read"):
        ReaderConfig(encoders=("oracle", "oracle-text"))
    with pytest.raises(ValueError, match="train_questions"):
        ReaderConfig(train_questions=0)
    with pytest.raises(ValueError, match="epochs"):
        ReaderConfig(epochs=0)


def test_markdown_puts_reads_and_intervals_beside_every_row():
    meta = {"light": "day", "sizes": {"train": 8, "val": 4, "train_frames": 2},
            "config": {"types": ["exist/0", "count/0"], "layers": 3, "width": 128,
                       "epochs": 12}}
    rows = [{"encoder": "oracle", "accuracy": 0.75, "ci95": [0.3, 0.95], "count": 4,
             "swapped_accuracy": 0.5, "swapped_ci95": [0.15, 0.85], "reads": 0.25,
             "per_type_hop": {"exist/0": 1.0, "count/0": 0.5}, "wall_s": 12.0},
            {"encoder": NO_TOKENS, "accuracy": 0.5, "ci95": [0.15, 0.85], "count": 4,
             "per_type_hop": {"exist/0": 0.5}, "wall_s": 10.0}]
    md = to_markdown({"meta": meta, "rows": rows})
    assert "| oracle | 75.0 [30.0, 95.0] | 50.0 [15.0, 85.0] | +25.0 | 100.0 | 50.0 |" in md
    assert f"| {NO_TOKENS} | 50.0 [15.0, 85.0] | — | — | 50.0 | — |" in md
    assert "oracle 12 s" in md
