"""The live-sample buffer: bounds and eviction, crash safety (truncated and missing files,
an unreadable manifest, a segment the manifest never named), no pickles, the time split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_daemon_support import toy_frame

from daemon.samples import MANIFEST, LiveSample, LiveSamples, SampleBuffer


def _samples(frame, n=2, source="objects", confidence=1.0):
    return [LiveSample(frame.frame_id, frame.timestamp, f"q{i}?", "yes", source, confidence,
                       "exist", 0) for i in range(n)]


def _fill(buffer, n_frames, per_frame=2):
    for i in range(n_frames):
        frame = toy_frame(f"f{i}", timestamp=float(i))
        buffer.add(frame, _samples(frame, per_frame))


def test_round_trip_keeps_sensors_and_records(tmp_path):
    buffer = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=1000)
    frame = toy_frame("a", timestamp=3.5, light=0.2)
    buffer.add(frame, _samples(frame, 3, source="pseudo", confidence=0.7))
    again = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=1000)
    [(read, samples)] = list(again.items())
    assert read.frame_id == "a" and read.timestamp == 3.5 and read.light == pytest.approx(0.2)
    for sensor, payload in frame.sensors.items():
        for name, array in payload.items():
            assert np.array_equal(read.sensors[sensor][name], array)
            assert read.sensors[sensor][name].dtype == array.dtype
    assert [s.question for s in samples] == ["q0?", "q1?", "q2?"]
    assert samples[0].source == "pseudo" and samples[0].confidence == 0.7
    assert len(again) == 3


def test_no_pickles_on_disk(tmp_path):
    buffer = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=1000)
    _fill(buffer, 2)
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        assert b"\x80\x04\x95" not in data and b"\x80\x05\x95" not in data  # pickle protocols
        assert path.suffix in (".safetensors", ".json")


def test_count_cap_evicts_the_oldest_segments(tmp_path):
    buffer = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=5)
    _fill(buffer, 4, per_frame=2)
    assert len(buffer) == 4 and buffer.evicted == 2
    assert [s.frame_id for s in buffer.segments()] == ["f2", "f3"]
    assert sorted(p.name for p in tmp_path.glob("seg-*")) == [s.file for s in buffer.segments()]


def test_byte_cap_evicts_the_oldest_segments(tmp_path):
    probe = SampleBuffer(tmp_path / "probe", max_bytes=10**8, max_samples=100)
    _fill(probe, 1)
    one = probe.nbytes
    buffer = SampleBuffer(tmp_path / "b", max_bytes=int(2.5 * one), max_samples=100)
    _fill(buffer, 5)
    assert [s.frame_id for s in buffer.segments()] == ["f3", "f4"]
    assert buffer.nbytes <= 2.5 * one


def test_a_truncated_segment_is_dropped_and_the_rest_kept(tmp_path):
    buffer = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=100)
    _fill(buffer, 3)
    last = tmp_path / buffer.segments()[-1].file
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    again = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=100)
    assert [s.frame_id for s in again.segments()] == ["f0", "f1"]
    assert not last.exists()
    assert len(json.loads((tmp_path / MANIFEST).read_text())["segments"]) == 2


def test_a_truncated_manifest_is_rebuilt_from_the_segments(tmp_path):
    buffer = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=100)
    _fill(buffer, 3)
    manifest = tmp_path / MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:20])
    again = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=100)
    assert [s.frame_id for s in again.segments()] == ["f0", "f1", "f2"]
    assert len(again) == 6


def test_a_segment_written_before_a_crash_is_adopted_a_torn_one_removed(tmp_path):
    buffer = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=100)
    _fill(buffer, 2)
    manifest = (tmp_path / MANIFEST).read_bytes()
    _fill(buffer, 3)  # f0..f2 again: seq 3..5
    (tmp_path / MANIFEST).write_bytes(manifest)  # the crash came before the manifest write
    torn = tmp_path / "seg-00000005.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    (tmp_path / ".tmp-leftover").write_bytes(b"x")
    again = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=100)
    assert [s.seq for s in again.segments()] == [1, 2, 3, 4]
    assert not torn.exists() and not (tmp_path / ".tmp-leftover").exists()


def test_split_holds_out_the_newest_frames(tmp_path):
    buffer = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=100)
    for i in (3, 0, 4, 1, 2):  # arrival order is not time order
        frame = toy_frame(f"f{i}", timestamp=float(i))
        buffer.add(frame, _samples(frame, 2))
    train, val = buffer.split(0.4)
    assert {s.frame_id for s in val} == {"f3", "f4"}
    assert {s.frame_id for s in train} == {"f0", "f1", "f2"}
    # teaching about a frame already held adds to the same frame: never on both sides
    frame = toy_frame("f4", timestamp=4.0)
    buffer.add(frame, [LiveSample("f4", 4.0, "taught?", "no", "taught")])
    train, val = buffer.split(0.2)
    assert {s.frame_id for s in val} == {"f4"} and len(val) == 3
    split = buffer.live_split("night", 0.2)
    assert set(split.frames) == {s.frame_key for s in train + val}
    assert split.val[0].meta["source"] in ("objects", "taught")
    with pytest.raises(ValueError):
        buffer.split(1.0)


def test_one_frame_has_no_held_out_slice(tmp_path):
    buffer = SampleBuffer(tmp_path, max_bytes=10**8, max_samples=100)
    _fill(buffer, 1)
    train, val = buffer.split(0.5)
    assert len(train) == 2 and val == []


def test_live_samples_gives_a_split_only_with_enough_samples(tmp_path):
    live = LiveSamples(tmp_path, 10**8, 1000, min_samples=6, val_fraction=0.25, mode="live")
    for i in range(2):
        frame = toy_frame(f"f{i}", timestamp=float(i))
        live.add("night", frame, _samples(frame, 2))
    assert live.training_split("night") is None  # 4 < 6
    assert live.training_split("day") is None
    frame = toy_frame("f2", timestamp=2.0)
    live.add("night", frame, _samples(frame, 2))
    split = live.training_split("night")
    assert split is not None and len(split.train) == 4 and len(split.val) == 2
    world = LiveSamples(tmp_path, 10**8, 1000, min_samples=6, mode="world")
    assert world.training_split("night") is None  # reopened from disk, but mode is world
    assert world.describe()["contexts"]["night"]["samples"] == 6
    with pytest.raises(ValueError):
        live.buffer("../etc")


def test_samples_are_validated():
    with pytest.raises(ValueError):
        LiveSample("f", 0.0, "q", "a", "guess")
    with pytest.raises(ValueError):
        LiveSample("f", 0.0, "q", "a", "pseudo", confidence=1.5)
