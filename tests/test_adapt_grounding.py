"""Grounding: answers with the frame's own tokens vs another frame's."""

from __future__ import annotations

import pytest
import torch

from adapt.evaluate import grounding
from adapt.features import FeatureSet
from scenes.sample import QAItem


def _data(frames: int = 6, per_frame: int = 3) -> FeatureSet:
    items, tokens = [], {}
    for f in range(frames):
        fid = f"f{f}"
        tokens[fid] = torch.full((2, 4), float(f))
        items += [QAItem(fid, f"q{k}", str(f), "count", 0) for k in range(per_frame)]
    return FeatureSet(items, {"cam": tokens})


class _Model:
    """Answers the count written in its tokens (reads) or always "0" (does not)."""

    modality_names = ["cam"]
    training = False

    def __init__(self, reads: bool):
        self.reads = reads

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def answer(self, questions, tokens):
        if not self.reads:
            return ["0"] * len(questions)
        return [str(int(t[0, 0])) for t in tokens["cam"]]


def test_swapped_frames_move_every_frame_and_keep_questions():
    data = _data()
    swapped = data.with_swapped_frames(seed=3)
    assert [it.question for it in swapped.items] == [it.question for it in data.items]
    for fid, own in data.tokens["cam"].items():
        assert not torch.equal(swapped.tokens["cam"][fid], own)
    # a permutation: every frame's tokens are used exactly once
    used = sorted(int(t[0, 0]) for t in swapped.tokens["cam"].values())
    assert used == list(range(6))


def test_swapping_needs_two_frames():
    with pytest.raises(ValueError, match="two frames"):
        _data(frames=1).with_swapped_frames()


def test_a_reading_model_loses_everything_and_a_blind_one_nothing():
    data = _data()
    reading = grounding(_Model(reads=True), data)
    assert reading.accuracy == 1.0 and reading.swapped_accuracy == 0.0
    assert reading.changed == 1.0 and reading.reads == 1.0
    blind = grounding(_Model(reads=False), data)
    assert blind.accuracy == blind.swapped_accuracy == pytest.approx(1 / 6)
    assert blind.changed == 0.0 and blind.reads == 0.0
    assert set(blind.to_dict()) >= {"accuracy", "swapped_accuracy", "reads", "changed", "ci95"}
