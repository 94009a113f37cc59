"""Camera encoder: one timm ViT shared by the six views; tokens = [CLS] of the last blocks.

The encoder setup of mPnP-LLM (arXiv 2312.07886): the [CLS] token of each of the last 4 blocks
(before the final norm) of each view, 6 views x 4 = 24 tokens. The default ViT is small because
it must pretrain and run on a 2-core CPU on the world's 64x112 views: patch 16 gives a 4x7 grid
(28 patches per view; the linear patch embedding still sees every pixel, so a far pedestrian's
colours reach a token; patch 8 was 3-4x slower to pretrain here), width 192 / 3 heads is ViT-
Tiny's, and depth 4 is the least that still has 4 distinct last blocks. A real timm checkpoint
(e.g. vit_base) loads through :func:`load_timm_checkpoint` into an encoder created with its
sizes. """

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from encoders.base import Encoder, check_frames, init_from_generator
from encoders.slots import ObjectSlots
from scenes.sample import CAMERA_VIEWS, Frame

log = logging.getLogger(__name__)

#: ImageNet statistics, so that real timm checkpoints see the inputs they were trained on.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass
class CameraViTConfig:
    """Sizes of the camera ViT (weights shared across the six views).

    Attributes:
        image_height / image_width: size of every view (the world renders 64x112).
        patch_size: square patch side in pixels; must divide both image sides.
        embed_dim / depth / num_heads / mlp_ratio: the ViT.
        cls_blocks: how many of the last blocks contribute their [CLS] token per view.
        slots: object slots per view (``encoders/slots.py``); 0 (default) keeps the paper's
            [CLS] tokens. With slots the tokens are the slots (6 x ``slots``), each
            pretrained to name one of its view's objects, nearest first.
        slot_layers: decoder layers of the slots.
        seed: initialisation seed (a fresh encoder is a pure function of its config).
    """

    image_height: int = 64
    image_width: int = 112
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    cls_blocks: int = 4
    slots: int = 0
    slot_layers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_height", "image_width", "patch_size", "embed_dim", "depth",
                     "num_heads", "cls_blocks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CameraViTConfig.{name} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.image_height % self.patch_size or self.image_width % self.patch_size:
            raise ValueError(f"CameraViTConfig.patch_size {self.patch_size} must divide the "
                             f"image size {self.image_height}x{self.image_width}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"CameraViTConfig.embed_dim {self.embed_dim} must be divisible by "
                             f"num_heads {self.num_heads}")
        if self.cls_blocks > self.depth:
            raise ValueError(f"CameraViTConfig.cls_blocks {self.cls_blocks} exceeds depth "
                             f"{self.depth}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"CameraViTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.slots < 0 or (self.slots and self.slot_layers < 1):
            raise ValueError(f"CameraViTConfig: slots must be >= 0 and slot_layers >= 1, got "
                             f"{self.slots} / {self.slot_layers}")


class CameraViTEncoder(Encoder):
    """Six camera views -> ``(B, 6 * cls_blocks, embed_dim)`` tokens, view-major order
    (view 0's blocks L-k..L-1, then view 1's, ...); with ``slots`` > 0, ``(B, 6 * slots,
    embed_dim)`` object slots instead (view 0's nearest-first slots, then view 1's, ...)."""

    kind = "camera-vit"
    modality = "camera"
    sensor = "camera"
    config_class = CameraViTConfig

    def __init__(self, config: CameraViTConfig) -> None:
        super().__init__(config)
        # Built without values on the meta device, then initialised from a private generator
        # seeded by config.seed (the process's global random stream is never touched).
        with torch.device("meta"):
            self.vit = VisionTransformer(
                img_size=(config.image_height, config.image_width),
                patch_size=config.patch_size, embed_dim=config.embed_dim, depth=config.depth,
                num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, num_classes=0,
                global_pool="token", class_token=True)
            self.slots = ObjectSlots(config.embed_dim, config.num_heads, config.slots,
                                     len(CAMERA_VIEWS), config.slot_layers, config.mlp_ratio
                                     ) if config.slots else None
        self.vit.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(int(config.seed))
        init_from_generator(self.vit, generator)
        if self.slots is not None:
            self.slots.to_empty(device="cpu")
            init_from_generator(self.slots, generator)
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 1, 3, 1, 1),
                             persistent=False)

    @property
    def num_tokens(self) -> int:
        return len(CAMERA_VIEWS) * (self.config.slots or self.config.cls_blocks)

    @property
    def object_slots(self) -> int:
        return self.config.slots

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    def example_input(self, batch: int = 1) -> torch.Tensor:
        c = self.config
        return torch.zeros(batch, len(CAMERA_VIEWS), 3, c.image_height, c.image_width)

    def region_layout(self) -> tuple[str, int]:
        return "views", len(CAMERA_VIEWS)

    def augment(self, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random horizontal flips per view (``x: (B, 6, 3, H, W)``): counts per view
        survive a flip."""
        flip = torch.rand(x.shape[:2], generator=generator) < 0.5
        return torch.where(flip[:, :, None, None, None], x.flip(-1), x), y

    def preprocess(self, frames: Sequence[Frame]) -> torch.Tensor:
        """Frames -> ``(B, 6, 3, H, W)`` float32 in [0, 1] (normalised in :meth:`forward`,
        so that the exported network takes plain pixels)."""
        check_frames(frames, f"{self.kind}.preprocess")
        c = self.config
        expected = (c.image_height, c.image_width, 3)
        for frame in frames:
            shape = frame.cameras[CAMERA_VIEWS[0]].shape
            if shape != expected:
                raise ValueError(f"{self.kind}: frame {frame.frame_id} has views of shape "
                                 f"{shape}, the encoder expects {expected} (create it with "
                                 f"image_height={shape[0]}, image_width={shape[1]})")
        pixels = np.stack([np.stack([f.cameras[v] for v in CAMERA_VIEWS]) for f in frames])
        x = torch.from_numpy(pixels).permute(0, 1, 4, 2, 3)  # (B, 6, 3, H, W) uint8
        return x.float().div_(255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1:3] != (len(CAMERA_VIEWS), 3):
            raise ValueError(f"{self.kind}.forward expects (B, 6, 3, H, W), got {tuple(x.shape)}")
        batch, views = x.shape[:2]
        x = ((x - self.mean) / self.std).flatten(0, 1)  # (B*6, 3, H, W)
        vit = self.vit
        h = vit.patch_embed(x)  # (B*6, P, D)
        h = vit._pos_embed(h)  # (B*6, 1+P, D): [CLS] prepended, positions added
        h = vit.norm_pre(h)
        if self.slots is not None:
            for block in vit.blocks:
                h = block(h)
            slots = self.slots(vit.norm(h)[:, 1:])  # the view's patch tokens -> (B*6, K, D)
            return slots.reshape(batch, views * self.config.slots, -1)
        first = len(vit.blocks) - self.config.cls_blocks
        cls_tokens = []
        for index, block in enumerate(vit.blocks):
            h = block(h)
            if index >= first:
                cls_tokens.append(h[:, 0])  # (B*6, D), before the final norm
        tokens = torch.stack(cls_tokens, dim=1)  # (B*6, k, D)
        return tokens.reshape(batch, views * self.config.cls_blocks, -1)  # (B, 6k, D)


def _vit_sizes(state: dict[str, torch.Tensor]) -> str:
    """Human-readable sizes of a timm ViT state dict (for error messages)."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        return "not a timm VisionTransformer state dict"
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    proj = state["patch_embed.proj.weight"]
    return (f"embed_dim={proj.shape[0]}, patch_size={proj.shape[-1]}, depth={depth}")


def load_timm_checkpoint(encoder: CameraViTEncoder, path: str | os.PathLike[str]) -> list[str]:
    """Load a local timm ViT safetensors checkpoint into ``encoder.vit``.

    The classifier head (and ``fc_norm``) are dropped; absolute position embeddings are
    resampled when the checkpoint was trained at another resolution. Any other missing
    key or shape mismatch raises ``ValueError`` naming the keys and the checkpoint's sizes.

    Returns:
        the checkpoint keys that were ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"timm checkpoint {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"timm checkpoint {path} is not a readable safetensors file ({exc})"
                         ) from exc
    target = encoder.vit.state_dict()
    ignored = sorted(k for k in state if k.startswith(("head.", "fc_norm.")) and k not in target)
    state = {k: v for k, v in state.items() if k not in ignored}
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != target["pos_embed"].shape and \
            pos.shape[-1] == target["pos_embed"].shape[-1]:
        grid = encoder.vit.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid),
                                                    num_prefix_tokens=1)
        log.info("resampled pos_embed %s -> %s", tuple(pos.shape), tuple(state["pos_embed"].shape))
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs encoder {tuple(target[k].shape)}"
             for k in sorted(set(state) & set(target)) if state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        c = encoder.config
        raise ValueError(
            f"timm checkpoint {path} does not fit the camera encoder "
            f"(encoder: embed_dim={c.embed_dim}, patch_size={c.patch_size}, depth={c.depth}; "
            f"checkpoint: {_vit_sizes(state)}): missing keys {missing[:6]}, unexpected keys "
            f"{unexpected[:6]}, shape mismatches {wrong[:4]}. Create the encoder with the "
            "checkpoint's sizes.")
    encoder.vit.load_state_dict(state, strict=True)
    return ignored
