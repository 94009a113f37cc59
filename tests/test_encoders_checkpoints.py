"""Loading foreign checkpoints: timm ViT safetensors (camera) and official RangeViT (LiDAR)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_encoders import TINY, make_frame
from timm.models.vision_transformer import VisionTransformer

from encoders import create_encoder
from encoders.camera import load_timm_checkpoint
from encoders.lidar import convert_rangevit_checkpoint, load_rangevit_checkpoint


def _timm_vit(img_size, embed_dim=32, depth=2, heads=2, classes=5) -> VisionTransformer:
    torch.manual_seed(123)
    return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=embed_dim, depth=depth,
                             num_heads=heads, num_classes=classes)


def _save(model: torch.nn.Module, path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_timm_checkpoint_loads_and_matches_timm(tmp_path):
    camera = create_encoder("camera-vit", **TINY["camera-vit"])  # 16x32 views
    reference = _timm_vit((16, 32)).eval()
    _save(reference, tmp_path / "vit.safetensors")
    ignored = load_timm_checkpoint(camera, tmp_path / "vit.safetensors")
    assert ignored == ["head.bias", "head.weight"]
    frame = make_frame(0)
    tokens = camera.encode([frame])  # (1, 6 * 2, 32); view 0's last-block [CLS] is index 1
    x = camera.preprocess([frame])[0, :1]
    x = (x - camera.mean[0]) / camera.std[0]
    with torch.no_grad():
        expected = reference.forward_features(x)[:, 0]  # timm applies the final norm
    torch.testing.assert_close(camera.vit.norm(tokens[:, 1]), expected, atol=1e-5, rtol=1e-5)


def test_timm_checkpoint_of_another_resolution_gets_resampled_positions(tmp_path):
    camera = create_encoder("camera-vit", **TINY["camera-vit"])
    _save(_timm_vit((32, 32)), tmp_path / "vit.safetensors")  # 4x4 grid vs the encoder's 2x4
    load_timm_checkpoint(camera, tmp_path / "vit.safetensors")
    assert camera.vit.pos_embed.shape == (1, 1 + 2 * 4, 32)
    assert torch.isfinite(camera.encode([make_frame(1)])).all()


def test_timm_checkpoint_mismatches_are_explained(tmp_path):
    camera = create_encoder("camera-vit", **TINY["camera-vit"])
    _save(_timm_vit((16, 32), embed_dim=48, heads=2), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="embed_dim=48.*shape mismatches"):
        load_timm_checkpoint(camera, tmp_path / "wide.safetensors")
    state = {k: v for k, v in _timm_vit((16, 32)).state_dict().items()
             if not k.startswith("blocks.1.")}
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="missing keys.*blocks.1"):
        load_timm_checkpoint(camera, tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_timm_checkpoint(camera, tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_timm_checkpoint(camera, tmp_path / "absent.safetensors")


def _official_layout(state: dict[str, torch.Tensor], prefix: str = "rangevit.encoder."
                     ) -> dict[str, torch.Tensor]:
    """Our LiDAR weights written the way valeoai/rangevit's training script saves them."""
    out = {prefix + k.replace("stem.", "patch_embed.", 1): v.clone() for k, v in state.items()}
    out["rangevit.decoder.head.weight"] = torch.zeros(17, 8)
    out["rangevit.kpclassifier.head.weight"] = torch.zeros(17, 8)
    return out


def test_rangevit_key_mapping_of_the_official_layout():
    official = {
        "rangevit.encoder.cls_token": torch.zeros(1),
        "rangevit.encoder.patch_embed.conv_block.0.conv1.weight": torch.zeros(1),
        "rangevit.encoder.patch_embed.conv_block.3.bn4.running_mean": torch.zeros(1),
        "rangevit.encoder.patch_embed.proj_block.1.weight": torch.zeros(1),
        "rangevit.encoder.blocks.11.attn.qkv.weight": torch.zeros(1),
        "rangevit.encoder.blocks.0.mlp.fc2.bias": torch.zeros(1),
        "rangevit.encoder.norm.weight": torch.zeros(1),
        "rangevit.decoder.up_conv.weight": torch.zeros(1),
        "rangevit.kpclassifier.head.weight": torch.zeros(1),
    }
    converted = convert_rangevit_checkpoint({"model": official, "epoch": 3})
    assert sorted(converted) == sorted([
        "cls_token", "stem.conv_block.0.conv1.weight", "stem.conv_block.3.bn4.running_mean",
        "stem.proj_block.1.weight", "blocks.11.attn.qkv.weight", "blocks.0.mlp.fc2.bias",
        "norm.weight"])
    ddp = convert_rangevit_checkpoint({"module." + k: v for k, v in official.items()})
    assert sorted(ddp) == sorted(converted)


def test_rangevit_checkpoint_round_trip_through_a_pth(tmp_path):
    source = create_encoder("lidar-rangevit", **TINY["lidar-rangevit"], seed=5)
    torch.save({"model": _official_layout(source.state_dict()), "epoch": 9},
               tmp_path / "best_model.pth")
    target = create_encoder("lidar-rangevit", **TINY["lidar-rangevit"])
    frames = [make_frame(2), make_frame(3)]
    assert not torch.equal(target.encode(frames), source.encode(frames))
    load_rangevit_checkpoint(target, tmp_path / "best_model.pth")
    assert torch.equal(target.encode(frames), source.encode(frames))


def test_rangevit_checkpoint_errors(tmp_path):
    lidar = create_encoder("lidar-rangevit", **TINY["lidar-rangevit"])
    with pytest.raises(ValueError, match="no RangeViT encoder keys"):
        convert_rangevit_checkpoint({"rangevit.decoder.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="linear patch embedding"):
        convert_rangevit_checkpoint({"rangevit.encoder.patch_embed.proj.weight": torch.zeros(1)})
    other = create_encoder("lidar-rangevit", **{**TINY["lidar-rangevit"],
                                                "stem_context_blocks": 2})
    save_file({k: v.contiguous() for k, v in _official_layout(other.state_dict()).items()},
              str(tmp_path / "deeper_stem.safetensors"))
    with pytest.raises(ValueError, match="stem_context_blocks=1.*unexpected keys"):
        load_rangevit_checkpoint(lidar, tmp_path / "deeper_stem.safetensors")
    with pytest.raises(FileNotFoundError):
        load_rangevit_checkpoint(lidar, tmp_path / "absent.pth")
