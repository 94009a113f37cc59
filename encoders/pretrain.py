"""Offline supervised pretraining of the encoders on the synthetic world, then freezing.

No pretrained weights can be downloaded here, so each encoder learns from the world's ground
truth: for every region of its tokens (camera: each view; LiDAR: each azimuth band) a
throw-away linear head predicts clipped counts per class and per distance ring
(:mod:`encoders.targets`). Day *and* night frames of the train split are used as they are:
the camera honestly loses what the dark hides, the LiDAR does not care. The trained encoder
is frozen and saved to ``<model store>/encoders/<kind>`` with a ``pretrain.json`` record;
:func:`ensure_pretrained` reuses it when it is there and valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoders import Encoder, EncoderFormatError, create_encoder, encoder_class, load_encoder
from encoders.targets import (
    IGNORE,
    OBJECT_FIELDS,
    TARGET_NAMES,
    region_counts,
)
from mpnp.files import atomic_write_text
from mpnp.paths import model_store_dir
from scenes.dataset import QADataset

log = logging.getLogger(__name__)

RECORD_FILE = "pretrain.json"
#: Epochs over the default world's train split (5,200 frames of 2,600 drives).
DEFAULT_EPOCHS = {"camera-vit": 2, "lidar-rangevit": 3, "lidar-objects": 8, "radar-pointnet": 4}
#: A separate pretraining corpus (``PretrainConfig(corpus=DEFAULT_CORPUS)``): 600 drives of
#: 2 frames, a third of them at night. The default world has thousands of short drives, so
#: by default the encoders pretrain on its train split instead.
DEFAULT_CORPUS = {"seed": 1000, "day_frames": 800, "night_frames": 400, "frames_per_scene": 2,
                  "questions_per_frame": 1}


@dataclass
class PretrainConfig:
    """How an encoder is pretrained.

    Attributes:
        epochs: passes over the train split (``None``: the kind's default).
        batch_size / lr / weight_decay / warmup_fraction: AdamW with a cosine schedule.
        max_count: counts are clipped to this and predicted as classes 0..max_count.
        augment: the encoder's :meth:`~encoders.base.Encoder.augment` (camera: random
            horizontal flips per view; LiDAR and radar: random rotations by whole azimuth
            bands, targets rotated with them). Encoders with object slots are not
            augmented: a flip or rotation would change their objects' directions.
        split: the world split trained on (``val`` is used for the record's accuracy).
        seed: data order, augmentation and head initialisation.
        encoder: overrides of the encoder's config (e.g. ``{"depth": 6}``).
        corpus: ``None`` (default) pretrains on the given world's ``split``; a dict of
            :class:`~scenes.synthetic.WorldConfig` fields pretrains on a world of its own,
            generated once into the model store (image and LiDAR sizes are copied from the
            given world; none of its scenes is in the QA world's test split).
    """

    epochs: int | None = None
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    max_count: int = 3
    augment: bool = True
    split: str = "train"
    seed: int = 0
    encoder: dict = field(default_factory=dict)
    corpus: dict | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"PretrainConfig.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.max_count < 1:
            raise ValueError("PretrainConfig.batch_size and max_count must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.warmup_fraction < 1:
            raise ValueError("PretrainConfig: lr must be > 0, weight_decay >= 0, "
                             "0 <= warmup_fraction < 1")
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"PretrainConfig.split must be train/val/test, got {self.split!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def encoder_dir(kind: str, store_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the pretrained encoder of ``kind`` lives in the model store."""
    return model_store_dir(store_dir) / "encoders" / kind


def default_world_dir(store_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``mpnp`` keeps the default generated world: ``<model store>/worlds/default``."""
    return model_store_dir(store_dir) / "worlds" / "default"


def region_layout(encoder: Encoder) -> tuple[str, int]:
    """How an encoder's tokens map to regions (:meth:`Encoder.region_layout`): ("views", 6)
    or ("bands", bands); tokens are region-major."""
    return encoder.region_layout()


def load_split(world_dir: str | os.PathLike[str], split: str) -> QADataset:
    root = Path(world_dir)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"no generated world at {root} (missing manifest.json); create "
                                f"one with `mpnp scenes generate --out {root}`")
    return QADataset.load(root, split)


def corpus_dir(world_dir: str | os.PathLike[str], corpus: dict,
               store_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """The pretraining corpus for ``world_dir`` (generated into the store on first use)."""
    from scenes.storage import read_manifest
    from scenes.synthetic import WorldConfig, generate_world

    load_split(world_dir, "train")  # the world must exist
    world = read_manifest(Path(world_dir))["config"]
    fields = {k: world[k] for k in ("image_height", "image_width", "lidar_beams", "lidar_width",
                                    "day_light", "night_light") if k in world}
    config = WorldConfig(**{**fields, **corpus, "train_fraction": 1.0, "val_fraction": 0.0})
    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    root = model_store_dir(store_dir) / "worlds" / f"pretrain-{key[:12]}"
    if not (root / "manifest.json").is_file():
        log.info("generating the pretraining corpus into %s", root)
        tmp = root.with_name(root.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        generate_world(config, tmp, progress=progress)
        os.replace(tmp, root)
    return root


def encode_inputs(encoder: Encoder, data: QADataset, max_count: int, chunk: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Preprocessed inputs, region count targets ``(N, R, Q)``, object-slot targets
    ``(N, R, K, F)`` (``None`` for an encoder without slots) and night flags ``(N,)``."""
    regions, n_regions = region_layout(encoder)
    ids = data.frame_ids
    inputs, targets, slots, night = [], [], [], []
    for start in range(0, len(ids), chunk):
        frames = [data.frame(i) for i in ids[start:start + chunk]]
        inputs.append(encoder.preprocess(frames))
        targets.append(torch.from_numpy(region_counts(frames, regions, n_regions, max_count)))
        if encoder.object_slots:
            slots.append(torch.from_numpy(encoder.slot_targets(frames)))
        night.extend(f.is_night for f in frames)
    return (torch.cat(inputs), torch.cat(targets), torch.cat(slots) if slots else None,
            torch.tensor(night))


class RegionHead(nn.Module):
    """Throw-away linear head: a region's tokens -> count logits per target."""

    def __init__(self, width: int, n_targets: int, n_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, n_targets * n_classes)
        self.shape = (n_targets, n_classes)

    def forward(self, tokens: torch.Tensor, n_regions: int) -> torch.Tensor:
        batch = tokens.shape[0]
        per_region = tokens.reshape(batch, n_regions, -1)  # (B, R, k*D): tokens are region-major
        return self.linear(self.norm(per_region)).reshape(batch, n_regions, *self.shape)


class SlotHead(nn.Module):
    """Throw-away linear head: each object slot -> logits of every :data:`OBJECT_FIELDS`
    field of its object."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, sum(OBJECT_FIELDS.values()))

    def forward(self, tokens: torch.Tensor, n_regions: int) -> list[torch.Tensor]:
        """``tokens`` ``(B, R*K, D)`` -> one ``(B, R, K, values)`` logit tensor per field."""
        batch = tokens.shape[0]
        logits = self.linear(self.norm(tokens)).reshape(batch, n_regions, -1,
                                                        self.linear.out_features)
        return list(logits.split(list(OBJECT_FIELDS.values()), dim=-1))


def slot_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean over fields of each field's cross-entropy (slots with nothing to say about a
    field, :data:`~encoders.targets.IGNORE`, do not count)."""
    losses = [nn.functional.cross_entropy(f.flatten(0, 2), targets[..., i].flatten(),
                                          ignore_index=IGNORE)
              for i, f in enumerate(logits)]
    return torch.stack(losses).mean()


def slot_accuracy(logits: list[torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
    """Per field, the share of slots (with something to say) whose value is right."""
    out = {}
    for i, (name, f) in enumerate(zip(OBJECT_FIELDS, logits)):
        t = targets[..., i]
        mask = t != IGNORE
        out[name] = round(float((f.argmax(-1)[mask] == t[mask]).float().mean()), 4)
    return out


def count_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(-1) == targets).float().mean())


def pretrain_epochs(kind: str, config: PretrainConfig | None = None) -> int:
    """Epochs ``kind`` pretrains for under ``config``: its own, else the kind's default."""
    if config is not None and config.epochs:
        return config.epochs
    return DEFAULT_EPOCHS.get(kind, 8)


def pretrain_encoder(kind: str, world_dir: str | os.PathLike[str],
                     config: PretrainConfig | None = None, progress: bool = True,
                     store_dir: str | os.PathLike[str] | None = None) -> tuple[Encoder, dict]:
    """Train a fresh encoder of ``kind`` on the world; returns it frozen, and a record."""
    from tqdm import tqdm

    config = config or PretrainConfig()
    epochs = pretrain_epochs(kind, config)
    encoder_class(kind)  # unknown kind -> ValueError before any work
    corpus = None
    if config.corpus is not None:
        corpus = corpus_dir(world_dir, config.corpus, store_dir, progress)
        train = load_split(corpus, "train")
    else:
        train = load_split(world_dir, config.split)
    torch.manual_seed(config.seed)
    encoder = create_encoder(kind, **config.encoder)
    _, n_regions = region_layout(encoder)
    started = time.perf_counter()
    x_all, y_all, slots_all, _ = encode_inputs(encoder, train, config.max_count)
    width = encoder.dim * encoder.num_tokens // n_regions
    head = RegionHead(width, len(TARGET_NAMES), config.max_count + 1)
    slot_head = SlotHead(encoder.dim) if slots_all is not None else None
    # A flip or a rotation by whole bands keeps a region's counts but not its objects'
    # directions, so object-slot encoders train on the frames as they are.
    augment = config.augment and slot_head is None
    params = list(encoder.parameters()) + list(head.parameters())
    if slot_head is not None:
        params += list(slot_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x_all) / config.batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(config.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    gen = torch.Generator().manual_seed(config.seed)
    loss_fn = nn.CrossEntropyLoss()
    encoder.train()
    head.train()
    bar = tqdm(total=total, desc=f"pretraining {kind}", unit="step", disable=not progress)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            x, y = x_all[index], y_all[index]
            if augment:
                x, y = encoder.augment(x, y, gen)
            tokens = encoder(x)
            logits = head(tokens, n_regions)  # (B, R, Q, max_count+1)
            loss = loss_fn(logits.flatten(0, 2), y.flatten())
            if slot_head is not None:
                loss = loss + slot_loss(slot_head(tokens, n_regions), slots_all[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-steps_per_epoch:]):.3f}")
        log.info("%s epoch %d/%d: train loss %.4f", kind, epoch + 1, epochs,
                 np.mean(losses[-steps_per_epoch:]))
    bar.close()
    train_seconds = time.perf_counter() - started
    encoder.freeze()
    head.eval()
    record = {"kind": kind, "world": str(Path(world_dir).resolve()),
              "corpus": str(corpus) if corpus else None, "epochs": epochs,
              "steps": total, "train_frames": len(x_all), "pretrain": config.to_dict(),
              "encoder_config": encoder.config_dict(), "wall_seconds": round(train_seconds, 1),
              "final_train_loss": round(float(np.mean(losses[-steps_per_epoch:])), 4),
              "val": _validate(encoder, head, slot_head, world_dir, config, n_regions)}
    log.info("pretrained %s in %.0f s: %s", kind, train_seconds, record["val"])
    return encoder, record


def _validate(encoder: Encoder, head: RegionHead, slot_head: SlotHead | None, world_dir,
              config: PretrainConfig, n_regions: int) -> dict:
    """Region count accuracy of the pretraining head on the val split, day and night, next to
    predicting the most common count of each target; with object slots, the slot head's
    accuracy per field."""
    data = load_split(world_dir, "val")
    x, y, slots, night = encode_inputs(encoder, data, config.max_count)
    with torch.no_grad():
        tokens = torch.cat([encoder(x[i:i + 32]) for i in range(0, len(x), 32)])
        logits = head(tokens, n_regions)
        slot_logits = slot_head(tokens, n_regions) if slot_head is not None else None
    majority = torch.mode(y.flatten(0, 1), dim=0).values  # (Q,) most common count per target
    out = {}
    for name, mask in (("day", ~night), ("night", night)):
        if mask.any():
            out[name] = {"frames": int(mask.sum()),
                         "count_accuracy": round(count_accuracy(logits[mask], y[mask]), 4),
                         "majority": round(float((y[mask] == majority).float().mean()), 4)}
            if slot_logits is not None:
                out[name]["slot_accuracy"] = slot_accuracy([f[mask] for f in slot_logits],
                                                           slots[mask])
    return out


def _as_json(value):
    return json.loads(json.dumps(value, sort_keys=True))


def stored_or_pretrained(kind: str, world_dir: str | os.PathLike[str],
                         store_dir: str | os.PathLike[str] | None = None,
                         progress: bool = True) -> Encoder:
    """The pretrained encoder of ``kind`` the model store holds, *whatever config made it*
    (``mpnp encoders pretrain --epochs 10`` followed by ``mpnp encoders probe`` probes those
    weights); pretrained with the defaults only when the store has none that loads. For
    tools that look at an encoder (probes, export), not for pipelines that need a given
    config (:func:`ensure_pretrained`)."""
    directory = encoder_dir(kind, store_dir)
    if (directory / RECORD_FILE).is_file():
        try:
            encoder, _ = _load_stored(kind, directory)
            log.info("using the stored %s encoder in %s", kind, directory)
            return encoder
        except _UNREADABLE as exc:
            log.warning("cannot load %s (%s)", directory, exc)
    return ensure_pretrained(kind, world_dir, store_dir, progress=progress)


#: What a missing, damaged or foreign stored encoder raises.
_UNREADABLE = (EncoderFormatError, FileNotFoundError, json.JSONDecodeError, OSError)


def _load_stored(kind: str, directory: Path) -> tuple[Encoder, dict]:
    """The encoder saved in ``directory`` and its pretraining record; raises one of
    :data:`_UNREADABLE` when either does not load or the encoder is not of ``kind``."""
    record = json.loads((directory / RECORD_FILE).read_text())
    encoder = load_encoder(directory)
    if encoder.kind != kind:
        raise EncoderFormatError(f"{directory} holds a {encoder.kind!r} encoder")
    return encoder, record


def ensure_pretrained(kind: str, world_dir: str | os.PathLike[str],
                      store_dir: str | os.PathLike[str] | None = None,
                      config: PretrainConfig | None = None, progress: bool = True,
                      force: bool = False) -> Encoder:
    """The frozen pretrained encoder of ``kind`` from the model store, pretraining (and
    saving) it first when it is missing, unreadable, or was trained with another
    ``config`` (default: :class:`PretrainConfig` ()) or another encoder config (so that
    changed defaults retrain). An encoder without weights (the oracle) is returned as
    created."""
    fresh = create_encoder(kind, **(config or PretrainConfig()).encoder)
    if not list(fresh.parameters()):
        return fresh.freeze()  # nothing to learn (the oracle): the encoder is its config
    directory = encoder_dir(kind, store_dir)
    if not force and (directory / RECORD_FILE).is_file():
        try:
            encoder, record = _load_stored(kind, directory)
            # Compare as JSON: tuples in the config come back from the record as lists.
            wanted = _as_json((config or PretrainConfig()).to_dict())
            expected_encoder = _as_json(encoder_class(kind).config_class(
                **(config or PretrainConfig()).encoder).__dict__)
            if record.get("pretrain") == wanted and \
                    _as_json(encoder.config_dict()) == expected_encoder:
                log.info("reusing the pretrained %s encoder in %s", kind, directory)
                return encoder
            log.info("%s was pretrained with another config; pretraining again", directory)
        except _UNREADABLE as exc:
            log.warning("cannot reuse %s (%s); pretraining again", directory, exc)
    encoder, record = pretrain_encoder(kind, world_dir, config, progress, store_dir)
    encoder.save(directory)
    record["fingerprint"] = encoder.fingerprint()
    atomic_write_text(directory / RECORD_FILE, json.dumps(record, indent=1))
    return encoder
