"""Feature cache (hits, misses on a changed encoder, atomic files) and ONNX parity."""

from __future__ import annotations

import pytest
import torch
from test_encoders import TINY, make_frame

from encoders import create_encoder, list_encoders
from encoders.cache import FeatureCache, encode_frames
from encoders.onnx_export import OnnxEncoder, OnnxRuntimeConfig, export_onnx


class CountingLoader:
    def __init__(self) -> None:
        self.loaded: list[str] = []

    def __call__(self, frame_id: str):
        self.loaded.append(frame_id)
        return make_frame(int(frame_id.split("-")[1]), frame_id=frame_id)


@pytest.mark.parametrize("kind", list_encoders())
def test_cache_hits_and_changed_encoder_misses(kind, tmp_path):
    encoder = create_encoder(kind, **TINY[kind]).freeze()
    cache = FeatureCache(tmp_path / "features")
    ids = [f"frame-{i}" for i in range(5)]
    loader = CountingLoader()
    first = encode_frames(encoder, ids, loader, cache, batch_size=2, progress=False, key_of=str)
    assert loader.loaded == ids
    assert list(first) == ids and first[ids[0]].shape == (encoder.num_tokens, encoder.dim)
    direct = encoder.encode([make_frame(3, frame_id="frame-3")])[0]
    torch.testing.assert_close(first["frame-3"], direct, atol=1e-5, rtol=1e-5)

    loader.loaded.clear()
    again = encode_frames(encoder, ids[::-1], loader, cache, progress=False, key_of=str)
    assert loader.loaded == []  # every frame came from the cache
    assert all(torch.equal(again[i], first[i]) for i in ids)

    if not list(encoder.parameters()):
        return  # a weightless encoder (the oracle) cannot change
    with torch.no_grad():  # every tensor, so that some weight the frames use changes
        for param in encoder.parameters():
            param.view(-1)[0] += 0.5
    changed = encode_frames(encoder, ids[:2], loader, cache, progress=False, key_of=str)
    assert loader.loaded == ids[:2]  # a changed encoder misses
    assert not torch.equal(changed[ids[0]], first[ids[0]])
    assert len(list((tmp_path / "features").iterdir())) == 2  # one folder per fingerprint
    assert not list((tmp_path / "features").rglob("*.tmp"))


def test_same_frame_id_with_other_content_misses_the_cache(tmp_path):
    """Frame ids repeat across worlds: the cache must key on the frame's content."""
    encoder = create_encoder("camera-vit", **TINY["camera-vit"]).freeze()
    cache = FeatureCache(tmp_path)
    world_a = {"day-0000-000": make_frame(1, frame_id="day-0000-000")}
    world_b = {"day-0000-000": make_frame(2, frame_id="day-0000-000")}
    a = encode_frames(encoder, list(world_a), world_a.__getitem__, cache, progress=False)
    b = encode_frames(encoder, list(world_b), world_b.__getitem__, cache, progress=False)
    torch.testing.assert_close(b["day-0000-000"], encoder.encode(list(world_b.values()))[0],
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a["day-0000-000"], b["day-0000-000"])
    assert len(cache.keys(encoder.fingerprint())) == 2
    again = encode_frames(encoder, list(world_a), world_a.__getitem__, cache, progress=False)
    assert torch.equal(again["day-0000-000"], a["day-0000-000"])  # same content: a hit
    assert len(cache.keys(encoder.fingerprint())) == 2


def test_cache_treats_a_corrupt_entry_as_a_miss_and_checks_names(tmp_path):
    encoder = create_encoder("lidar-rangevit", **TINY["lidar-rangevit"]).freeze()
    cache = FeatureCache(tmp_path)
    loader = CountingLoader()
    encode_frames(encoder, ["frame-1"], loader, cache, progress=False, key_of=str)
    cache.path(encoder.fingerprint(), "frame-1").write_bytes(b"half a file")
    assert cache.get(encoder.fingerprint(), "frame-1") is None
    encode_frames(encoder, ["frame-1"], loader, cache, progress=False, key_of=str)
    assert loader.loaded == ["frame-1", "frame-1"]
    assert cache.get(encoder.fingerprint(), "frame-1") is not None
    with pytest.raises(ValueError, match="cannot be a cache file name"):
        cache.path(encoder.fingerprint(), "../escape")
    with pytest.raises(ValueError, match="fingerprint"):
        cache.path("not-hex", "frame-1")


@pytest.mark.parametrize("kind,slots", [(k, 0) for k in list_encoders()]
                         + [("camera-vit", 2), ("lidar-rangevit", 2)])
def test_onnx_matches_torch(kind, slots, tmp_path):
    extra = {"slots": slots} if slots else {}  # object slots: decoder layers export too
    encoder = create_encoder(kind, **TINY[kind], **extra).freeze()
    path = export_onnx(encoder, tmp_path / f"{kind}.onnx")
    runtime = OnnxEncoder(path, encoder, OnnxRuntimeConfig(providers=("CPUExecutionProvider",)))
    frames = [make_frame(i) for i in range(3)]  # batch 3: the export used batch 2
    expected = encoder.encode(frames)
    got = runtime.encode(frames)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-4
    assert runtime.providers == ["CPUExecutionProvider"]


def test_onnx_runtime_config_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one provider"):
        OnnxRuntimeConfig(providers=())
    with pytest.raises(ValueError, match="not in providers"):
        OnnxRuntimeConfig(provider_options={"CUDAExecutionProvider": {"device_id": 0}})
    encoder = create_encoder("camera-vit", **TINY["camera-vit"]).freeze()
    path = export_onnx(encoder, tmp_path / "cam.onnx")
    strict = OnnxRuntimeConfig(providers=("NoSuchExecutionProvider", "CPUExecutionProvider"),
                               require_all=True)
    with pytest.raises(ValueError, match="NoSuchExecutionProvider is not available"):
        OnnxEncoder(path, encoder, strict)
    lenient = OnnxRuntimeConfig(providers=("NoSuchExecutionProvider", "CPUExecutionProvider"))
    assert OnnxEncoder(path, encoder, lenient).providers == ["CPUExecutionProvider"]
    with pytest.raises(FileNotFoundError, match="mpnp encoders export"):
        OnnxEncoder(tmp_path / "absent.onnx", encoder)


def test_latency_bench_rows(tmp_path):
    from bench.encoders import run, to_markdown

    tiny = {k: create_encoder(k, **TINY[k]) for k in list_encoders()}
    result = run(list_encoders(), (1, 2), rounds=2, warmup=1, encoders=tiny)
    assert [(r["kind"], r["batch"]) for r in result["rows"]] == [
        (k, b) for k in list_encoders() for b in (1, 2)]
    for row in result["rows"]:
        assert row["max_abs_diff"] < 1e-4 and row["ratio_torch_over_ort"] > 0
        assert row["torch"]["median_ms"] > 0 and row["onnxruntime"]["median_ms"] > 0
    assert "| camera-vit | 2 |" in to_markdown(result)
