"""LiDAR encoder in the style of RangeViT: range image -> conv stem -> ViT -> azimuth tokens.

A sweep is projected to the 5-channel spherical range image of RangeViT (arXiv 2301.10222)
(:func:`scenes.range_image.points_to_range_image`). A small convolutional stem (residual
"context" blocks at full resolution, then average pooling to patches, as RangeViT's
``ConvStem``) makes the patch tokens; timm ViT blocks mix them. The patch tokens of the last
``token_blocks`` blocks (before the final norm) are averaged over elevation and over equal
azimuth sectors ("bands"), giving ``bands x token_blocks`` tokens that keep *where* around the
vehicle things are. Parameter names follow the official RangeViT encoder (stem for
``patch_embed``), so :func:`convert_rangevit_checkpoint` is a renaming.
"""

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
from timm.models.vision_transformer import Block
from torch import nn

from encoders.base import Encoder, check_frames, init_from_generator
from encoders.slots import ObjectSlots
from scenes.range_image import points_to_range_image
from scenes.sample import Frame

log = logging.getLogger(__name__)

RANGE_CHANNELS = 5


@dataclass
class LidarRangeViTConfig:
    """Sizes of the LiDAR range-image ViT.

    Attributes:
        beams / range_width: range-image rows (LiDAR beams) and azimuth columns (128 columns,
            2.8 degrees each, keep the stem cheap enough to pretrain on a 2-core CPU; the
            nearest return wins a pixel, so small objects survive the coarse grid).
        fov_up_deg / fov_down_deg: vertical field of view of the projection.
        stem_channels / stem_hidden: widths of the conv stem (RangeViT: 32 / 64, halved
            here for the CPU).
        stem_context_blocks: residual context blocks before the last stem block (RangeViT: 3).
        patch_stride: (rows, columns) pooled into one token; both even (default: an 8 x 16
            token grid).
        embed_dim / depth / num_heads / mlp_ratio: the ViT.
        bands: azimuth sectors the tokens are averaged into (must divide the token columns).
        token_blocks: how many of the last blocks contribute their band tokens.
        slots: object slots per band (``encoders/slots.py``); 0 (default) keeps the averaged
            band tokens. With slots the tokens are the slots (bands x ``slots``), each
            pretrained to name one of its band's objects, nearest first; a band's slots read
            its token columns and one column on either side.
        slot_layers: decoder layers of the slots.
        seed: initialisation seed.
    """

    beams: int = 32
    range_width: int = 128
    fov_up_deg: float = 10.0
    fov_down_deg: float = -30.0
    stem_channels: int = 16
    stem_hidden: int = 32
    stem_context_blocks: int = 2
    patch_stride: tuple[int, int] = (4, 8)
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    bands: int = 8
    token_blocks: int = 2
    slots: int = 0
    slot_layers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        self.patch_stride = tuple(int(v) for v in self.patch_stride)
        for name in ("beams", "range_width", "stem_channels", "stem_hidden", "embed_dim",
                     "depth", "num_heads", "bands", "token_blocks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LidarRangeViTConfig.{name} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.stem_context_blocks < 0:
            raise ValueError("LidarRangeViTConfig.stem_context_blocks must be >= 0")
        if len(self.patch_stride) != 2 or any(s < 2 or s % 2 for s in self.patch_stride):
            raise ValueError(f"LidarRangeViTConfig.patch_stride must be two even numbers >= 2, "
                             f"got {self.patch_stride}")
        if self.beams % self.patch_stride[0] or self.range_width % self.patch_stride[1]:
            raise ValueError(f"LidarRangeViTConfig.patch_stride {self.patch_stride} must divide "
                             f"the range image {self.beams}x{self.range_width}")
        if (self.range_width // self.patch_stride[1]) % self.bands:
            raise ValueError(f"LidarRangeViTConfig.bands {self.bands} must divide the "
                             f"{self.range_width // self.patch_stride[1]} token columns")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"LidarRangeViTConfig.embed_dim {self.embed_dim} must be divisible "
                             f"by num_heads {self.num_heads}")
        if self.token_blocks > self.depth:
            raise ValueError(f"LidarRangeViTConfig.token_blocks {self.token_blocks} exceeds "
                             f"depth {self.depth}")
        if self.slots < 0 or (self.slots and self.slot_layers < 1):
            raise ValueError(f"LidarRangeViTConfig: slots must be >= 0 and slot_layers >= 1, "
                             f"got {self.slots} / {self.slot_layers}")
        if not self.fov_down_deg < self.fov_up_deg:
            raise ValueError("LidarRangeViTConfig: fov_down_deg must be below fov_up_deg")

    @property
    def grid(self) -> tuple[int, int]:
        return self.beams // self.patch_stride[0], self.range_width // self.patch_stride[1]


class ResContextBlock(nn.Module):
    """1x1 projection, then a 3x3 and a dilated 3x3 conv added back (SalsaNext/RangeViT)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, dilation=2, padding=2)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.act(self.conv1(x))
        a = self.bn1(self.act(self.conv2(shortcut)))
        b = self.bn2(self.act(self.conv3(a)))
        return shortcut + b


class ResBlock(nn.Module):
    """Three stacked convs of growing receptive field, concatenated and fused (no pooling)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, dilation=2, padding=2)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv4 = nn.Conv2d(out_channels, out_channels, 2, dilation=2, padding=1)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.conv5 = nn.Conv2d(out_channels * 3, out_channels, 1)
        self.bn4 = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.act(self.conv1(x))
        a1 = self.bn1(self.act(self.conv2(x)))
        a2 = self.bn2(self.act(self.conv3(a1)))
        a3 = self.bn3(self.act(self.conv4(a2)))
        fused = self.bn4(self.act(self.conv5(torch.cat((a1, a2, a3), dim=1))))
        return shortcut + fused


class RangeStem(nn.Module):
    """Conv blocks at full resolution, then average-pool each patch and project to width D."""

    def __init__(self, config: LidarRangeViTConfig) -> None:
        super().__init__()
        c = config
        blocks: list[nn.Module] = []
        channels = RANGE_CHANNELS
        for _ in range(c.stem_context_blocks):
            blocks.append(ResContextBlock(channels, c.stem_channels))
            channels = c.stem_channels
        blocks.append(ResBlock(channels, c.stem_hidden))
        self.conv_block = nn.Sequential(*blocks)
        sr, sc = c.patch_stride
        self.proj_block = nn.Sequential(
            nn.AvgPool2d(kernel_size=(sr + 1, sc + 1), stride=(sr, sc), padding=(sr // 2, sc // 2)),
            nn.Conv2d(c.stem_hidden, c.embed_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_block(self.conv_block(x))  # (B, D, rows, cols)


class LidarRangeViTEncoder(Encoder):
    """LiDAR sweep -> ``(B, bands * token_blocks, embed_dim)`` tokens, band-major order
    (band 0's blocks L-k..L-1, then band 1's, ...); band 0 starts behind the vehicle and
    bands advance counter-clockwise like the range-image columns."""

    kind = "lidar-rangevit"
    modality = "lidar"
    sensor = "lidar"
    config_class = LidarRangeViTConfig

    def __init__(self, config: LidarRangeViTConfig) -> None:
        super().__init__(config)
        c = config
        rows, cols = c.grid
        # Built without values on the meta device, then initialised from a private generator
        # seeded by c.seed (the process's global random stream is never touched).
        with torch.device("meta"):
            self.stem = RangeStem(c)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + rows * cols, c.embed_dim))
            self.blocks = nn.ModuleList(
                Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=True)
                for _ in range(c.depth))
            self.norm = nn.LayerNorm(c.embed_dim)  # kept for RangeViT checkpoint parity
        self.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(int(c.seed))
        init_from_generator(self, generator)
        self.slots = None
        if c.slots:
            with torch.device("meta"):
                self.slots = ObjectSlots(c.embed_dim, c.num_heads, c.slots, c.bands,
                                         c.slot_layers, c.mlp_ratio)
            self.slots.to_empty(device="cpu")
            init_from_generator(self.slots, generator)
            per_band = cols // c.bands
            columns = (torch.arange(-1, per_band + 1)[None]
                       + per_band * torch.arange(c.bands)[:, None])
            self.register_buffer("band_columns", columns % cols, persistent=False)  # (bands, w+2)

    @property
    def num_tokens(self) -> int:
        return self.config.bands * (self.config.slots or self.config.token_blocks)

    @property
    def object_slots(self) -> int:
        return self.config.slots

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, RANGE_CHANNELS, self.config.beams, self.config.range_width)

    def region_layout(self) -> tuple[str, int]:
        return "bands", self.config.bands

    def augment(self, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate the sweep by whole bands (``x: (B, 5, beams, width)``), targets with it."""
        bands = y.shape[1]
        shift = int(torch.randint(bands, (1,), generator=generator))
        return torch.roll(x, shift * (x.shape[-1] // bands), dims=-1), torch.roll(y, shift, dims=1)

    def preprocess(self, frames: Sequence[Frame]) -> torch.Tensor:
        """Frames -> normalised range images ``(B, 5, beams, range_width)``."""
        check_frames(frames, f"{self.kind}.preprocess")
        c = self.config
        images = [points_to_range_image(f.lidar, beams=c.beams, width=c.range_width,
                                        fov_up_deg=c.fov_up_deg, fov_down_deg=c.fov_down_deg)
                  for f in frames]
        return torch.from_numpy(np.stack(images))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        expected = (RANGE_CHANNELS, c.beams, c.range_width)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{self.kind}.forward expects (B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}), got {tuple(x.shape)}")
        batch = x.shape[0]
        rows, cols = c.grid
        h = self.stem(x).flatten(2).transpose(1, 2)  # (B, rows*cols, D)
        h = torch.cat((self.cls_token.expand(batch, -1, -1), h), dim=1) + self.pos_embed
        if self.slots is not None:
            for block in self.blocks:
                h = block(h)
            grid = self.norm(h[:, 1:]).reshape(batch, rows, cols, -1)
            memory = grid[:, :, self.band_columns]  # (B, rows, bands, w+2, D)
            memory = memory.permute(0, 2, 1, 3, 4).reshape(batch * c.bands, -1, grid.shape[-1])
            return self.slots(memory).reshape(batch, c.bands * c.slots, -1)
        first = c.depth - c.token_blocks
        band_tokens = []
        for index, block in enumerate(self.blocks):
            h = block(h)
            if index >= first:
                grid = h[:, 1:].reshape(batch, rows, c.bands, cols // c.bands, -1)
                band_tokens.append(grid.mean(dim=(1, 3)))  # (B, bands, D)
        tokens = torch.stack(band_tokens, dim=2)  # (B, bands, k, D)
        return tokens.reshape(batch, c.bands * c.token_blocks, -1)


def convert_rangevit_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the official RangeViT (valeoai/rangevit) key layout to this encoder's.

    The official training script saves ``{"model": RangeViT.state_dict(), "optimizer": ...}``
    with keys ``rangevit.encoder.{cls_token, pos_embed, patch_embed.conv_block.*,
    patch_embed.proj_block.1.*, blocks.<i>.{norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1,
    mlp.fc2}.*, norm.*}`` plus ``rangevit.decoder.*`` / ``rangevit.kpclassifier.*`` heads
    (and a ``module.`` prefix when saved from DistributedDataParallel). Heads are dropped;
    ``patch_embed`` becomes ``stem``; block names are timm's and stay as they are.

    Raises:
        ValueError: no encoder key found, or a plain patch-embedding (no conv stem) model.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        for prefix in ("rangevit.encoder.", "encoder."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        else:
            continue  # decoder, kpclassifier, optimizer state ...
        if name.startswith("patch_embed.proj."):
            raise ValueError("this RangeViT checkpoint uses a linear patch embedding "
                             f"({key}); only the conv-stem variant (conv_stem: ConvStem) maps "
                             "onto the LiDAR encoder")
        if name.startswith("patch_embed."):
            name = "stem." + name[len("patch_embed."):]
        out[name] = value
    if not out:
        raise ValueError("no RangeViT encoder keys (rangevit.encoder.*) found in the checkpoint")
    return out


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"RangeViT checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        # Official checkpoints are torch pickles: read tensors only, never code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"RangeViT checkpoint {path} is not readable ({exc})") from exc


def load_rangevit_checkpoint(encoder: LidarRangeViTEncoder,
                             path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load an official RangeViT checkpoint (``.pth`` or ``.safetensors``) into ``encoder``.

    Position embeddings are resampled to the encoder's token grid; anything else that does
    not fit raises ``ValueError`` naming the keys. Returns the converted state dict.
    """
    path = Path(path)
    state = convert_rangevit_checkpoint(_read_checkpoint(path))
    target = encoder.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != target["pos_embed"].shape and \
            pos.shape[-1] == target["pos_embed"].shape[-1]:
        old_cols = encoder.config.grid[1]
        old_rows = (pos.shape[1] - 1) // old_cols
        if old_rows * old_cols == pos.shape[1] - 1:
            state["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(encoder.config.grid), old_size=[old_rows, old_cols],
                num_prefix_tokens=1)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs encoder {tuple(target[k].shape)}"
             for k in sorted(set(state) & set(target)) if state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        c = encoder.config
        raise ValueError(
            f"RangeViT checkpoint {path} does not fit the LiDAR encoder (encoder: embed_dim="
            f"{c.embed_dim}, depth={c.depth}, stem_channels={c.stem_channels}, stem_hidden="
            f"{c.stem_hidden}, stem_context_blocks={c.stem_context_blocks}): missing keys "
            f"{missing[:6]}, unexpected keys {unexpected[:6]}, shape mismatches {wrong[:4]}. "
            "Official RangeViT uses vit_small sizes (embed_dim=384, depth=12, num_heads=6, "
            "stem_channels=32, stem_hidden=256, stem_context_blocks=3, patch_stride=(2, 8)).")
    encoder.load_state_dict(state, strict=True)
    return state
