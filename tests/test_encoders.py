"""Shared behaviour of every registered encoder (one suite, parametrized over the registry)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from encoders import (
    Encoder,
    EncoderFormatError,
    create_encoder,
    list_encoders,
    load_encoder,
    register_encoder,
)
from encoders.base import CONFIG_FILE, DIAGNOSTIC_MODALITIES, WEIGHTS_FILE
from scenes.sample import CAMERA_VIEWS, Frame, ObjectAnnotation
from scenes.sensors import derive_sensors

#: Tiny configs so the suite runs in seconds on a 2-core CPU.
TINY = {
    "camera-vit": dict(image_height=16, image_width=32, patch_size=8, embed_dim=32, depth=2,
                       num_heads=2, cls_blocks=2),
    "lidar-rangevit": dict(beams=8, range_width=64, stem_channels=4, stem_hidden=8,
                           stem_context_blocks=1, patch_stride=(4, 16), embed_dim=32, depth=2,
                           num_heads=2, bands=4, token_blocks=2),
    "radar-pointnet": dict(max_points=32, hidden=16, embed_dim=16, depth=1, num_heads=2,
                           bands=4),
    "lidar-objects": dict(max_segments=6, min_points=1, hidden=16, embed_dim=16, depth=1,
                          num_heads=2),
    "oracle": dict(max_objects=4),
}


def make_frame(seed: int, height: int = 16, width: int = 32, frame_id: str | None = None
               ) -> Frame:
    rng = np.random.default_rng(seed)
    cameras = {v: rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for v in CAMERA_VIEWS}
    n = 400
    azimuth = rng.uniform(-np.pi, np.pi, n)
    dist = rng.uniform(2, 30, n)
    lidar = np.stack([dist * np.cos(azimuth), dist * np.sin(azimuth),
                      rng.uniform(-1.8, 1.0, n), rng.uniform(0, 1, n)], axis=1)
    objects = [ObjectAnnotation(str(rng.choice(["car", "bus", "pedestrian"])),
                                (float(rng.uniform(-30, 30)), float(rng.uniform(-10, 10)), 0.8),
                                (1.8, 4.5, 1.5), float(rng.uniform(-3, 3)), "parked")
               for _ in range(int(rng.integers(1, 6)))]
    frame = Frame.from_rig(frame_id or f"f{seed}", "s0", 0.0, 1.0, cameras,
                           lidar.astype(np.float32), objects)
    return derive_sensors(frame)  # the radar's returns from the objects


def _needs_weights(encoder: Encoder) -> None:
    if not list(encoder.parameters()):
        pytest.skip(f"{encoder.kind} has no weights")


@pytest.fixture(params=list_encoders())
def encoder(request) -> Encoder:
    return create_encoder(request.param, **TINY[request.param])


def test_registry_lists_both_kinds_and_rejects_bad_names():
    assert {"camera-vit", "lidar-rangevit", "radar-pointnet"} <= set(list_encoders())
    with pytest.raises(ValueError, match="known: camera-vit"):
        create_encoder("sonar-pointnet")
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("camera-vit", type(create_encoder("camera-vit", **TINY["camera-vit"])))
    with pytest.raises(ValueError, match="no config fields"):
        create_encoder("camera-vit", widht=3)


def test_every_encoder_is_covered_by_tiny_configs():
    assert set(TINY) == set(list_encoders())


def test_shapes_and_dtype(encoder):
    frames = [make_frame(0), make_frame(1), make_frame(2)]
    tokens = encoder.encode(frames)
    assert tokens.shape == (3, encoder.num_tokens, encoder.dim)
    assert tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()
    assert encoder.modality == encoder.sensor or encoder.sensor is None and \
        encoder.modality in DIAGNOSTIC_MODALITIES
    x = encoder.preprocess(frames)
    assert x.shape[1:] == encoder.example_input(1).shape[1:]


def test_deterministic_and_seeded(encoder):
    frames = [make_frame(3)]
    again = create_encoder(encoder.kind, **TINY[encoder.kind])
    assert torch.equal(encoder.encode(frames), encoder.encode(frames))
    assert torch.equal(encoder.encode(frames), again.encode(frames))
    assert encoder.fingerprint() == again.fingerprint()
    if list(encoder.parameters()):
        other_seed = create_encoder(encoder.kind, **TINY[encoder.kind], seed=1)
        assert other_seed.fingerprint() != encoder.fingerprint()


def test_batch_independence(encoder):
    a, b = make_frame(4), make_frame(5)
    together = encoder.encode([a, b])
    torch.testing.assert_close(together[0], encoder.encode([a])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], encoder.encode([b])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_encode_is_frozen_and_restores_mode(encoder):
    encoder.train()
    tokens = encoder.encode([make_frame(6)])
    assert not tokens.requires_grad
    assert encoder.training  # encode does not change the caller's mode
    encoder.freeze()
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())


def test_save_load_round_trip_is_exact(encoder, tmp_path):
    with torch.no_grad():  # make the weights differ from a fresh encoder of the same seed
        for p in encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    encoder.save(tmp_path / "enc")
    header = json.loads((tmp_path / "enc" / CONFIG_FILE).read_text())
    assert header["type"] == "mpnp-encoder" and header["kind"] == encoder.kind
    loaded = load_encoder(tmp_path / "enc")
    assert type(loaded) is type(encoder) and loaded.config == encoder.config
    frames = [make_frame(7), make_frame(8)]
    assert torch.equal(loaded.encode(frames), encoder.encode(frames))
    assert loaded.fingerprint() == encoder.fingerprint()
    assert all(not p.requires_grad for p in loaded.parameters())


def test_fingerprint_changes_when_one_weight_changes(encoder):
    _needs_weights(encoder)
    before = encoder.fingerprint()
    name, param = next(iter(encoder.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] += 1e-3
    assert encoder.fingerprint() != before, name


def test_bad_input_errors(encoder):
    with pytest.raises(ValueError, match="empty batch"):
        encoder.encode([])
    with pytest.raises(ValueError, match="single Frame"):
        encoder.preprocess(make_frame(0))
    broken = make_frame(0)
    broken.sensors["lidar"]["LIDAR_TOP"] = broken.lidar[:, :3]
    with pytest.raises(ValueError, match="lidar: LIDAR_TOP: shape must be"):
        encoder.encode([broken])
    with pytest.raises(ValueError, match="expects"):
        encoder(torch.zeros(2, 3))


def test_camera_rejects_wrong_image_size():
    camera = create_encoder("camera-vit", **TINY["camera-vit"])
    with pytest.raises(ValueError, match="image_height=24, image_width=40"):
        camera.encode([make_frame(0, height=24, width=40)])


def test_missing_and_corrupt_files_name_the_path_and_the_fix(encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="mpnp prepare"):
        load_encoder(tmp_path / "nothing")
    encoder.save(tmp_path / "enc")
    (tmp_path / "enc" / WEIGHTS_FILE).write_bytes(b"not safetensors at all")
    with pytest.raises(EncoderFormatError, match=f"{WEIGHTS_FILE}.*corrupt.*mpnp prepare"):
        load_encoder(tmp_path / "enc")
    (tmp_path / "enc" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_encoder(tmp_path / "enc")
    (tmp_path / "enc" / CONFIG_FILE).write_text("{broken")
    with pytest.raises(EncoderFormatError, match=CONFIG_FILE):
        load_encoder(tmp_path / "enc")


def test_weights_of_another_config_are_rejected(encoder, tmp_path):
    _needs_weights(encoder)
    encoder.save(tmp_path / "enc")
    header = json.loads((tmp_path / "enc" / CONFIG_FILE).read_text())
    header["config"]["embed_dim"] = 64
    header["config"]["num_heads"] = 2
    (tmp_path / "enc" / CONFIG_FILE).write_text(json.dumps(header))
    with pytest.raises(EncoderFormatError, match="do not match its config"):
        load_encoder(tmp_path / "enc")


@pytest.mark.parametrize("kind,field,value", [
    ("camera-vit", "patch_size", 7),
    ("camera-vit", "cls_blocks", 9),
    ("lidar-rangevit", "bands", 3),
    ("lidar-rangevit", "patch_stride", (3, 16)),
])
def test_config_validation(kind, field, value):
    with pytest.raises(ValueError, match=field):
        create_encoder(kind, **{**TINY[kind], field: value})


@pytest.mark.parametrize("kind", sorted(TINY))
def test_creating_an_encoder_leaves_the_global_random_stream_alone(kind):
    """Initialisation draws from a private generator: nothing reseeds or advances the
    process's global stream (a serving process creates encoders on demand)."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = create_encoder(kind, **TINY[kind])
    assert torch.equal(before, torch.get_rng_state())
    again = create_encoder(kind, **TINY[kind])  # still deterministic from the config's seed
    assert first.fingerprint() == again.fingerprint()
