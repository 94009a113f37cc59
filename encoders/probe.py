"""Linear probes: do the frozen tokens carry the scene?

For each encoder, a linear classifier reads the flattened, standardised tokens of a frame and
predicts, for every class, (a) whether the frame holds an object of that class and (b) how
many (0, 1, 2, 3+). It is trained on the train split (weight decay chosen on val) and scored
on the test split, separately for day and night frames, next to the majority answer of
each class from the train split. Splits are by scene, so no drive is in two splits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoders.cache import FeatureCache, encode_frames
from encoders.pretrain import ensure_pretrained, load_split
from encoders.targets import frame_class_counts
from mpnp.paths import model_store_dir
from scenes.layout import CLASS_NAMES

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """Linear probe training.

    Attributes:
        max_count: counts are clipped to this (classes 0..max_count).
        weight_decays: candidates, the best on the val split is kept.
        steps / lr: full-batch AdamW steps.
        seed: head initialisation.
    """

    max_count: int = 3
    weight_decays: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    steps: int = 300
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        self.weight_decays = tuple(float(w) for w in self.weight_decays)
        if self.max_count < 1 or self.steps < 1 or self.lr <= 0 or not self.weight_decays:
            raise ValueError("ProbeConfig: max_count and steps must be >= 1, lr > 0, and at "
                             "least one weight decay given")


def fit_linear_probe(features: torch.Tensor, targets: torch.Tensor, n_classes: int,
                     weight_decay: float, config: ProbeConfig) -> nn.Linear:
    """Multi-task linear softmax classifier ``(N, F) -> (N, C, n_classes)``."""
    torch.manual_seed(config.seed)
    probe = nn.Linear(features.shape[1], targets.shape[1] * n_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=weight_decay)
    for _ in range(config.steps):
        logits = probe(features).reshape(len(features), -1, n_classes)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()


def _predict(probe: nn.Linear, features: torch.Tensor, n_classes: int) -> torch.Tensor:
    with torch.no_grad():
        return probe(features).reshape(len(features), -1, n_classes).argmax(-1)


def _split_tokens(encoder, world_dir, split: str, cache: FeatureCache | None, progress: bool):
    data = load_split(world_dir, split)
    ids = data.frame_ids
    tokens = encode_frames(encoder, ids, data.frame, cache, progress=progress)
    features = torch.stack([tokens[i].flatten() for i in ids])  # (N, T*D)
    frames_counts = []
    for start in range(0, len(ids), 64):
        frames_counts.append(frame_class_counts([data.frame(i) for i in ids[start:start + 64]]))
    night = torch.tensor([data.frame_info(i).night for i in ids])
    return features, torch.from_numpy(np.concatenate(frames_counts)), night


def probe_encoder(encoder, world_dir, config: ProbeConfig | None = None,
                  cache: FeatureCache | None = None, progress: bool = True) -> dict:
    """Probe accuracies of one frozen encoder (see the module docstring)."""
    config = config or ProbeConfig()
    splits = {s: _split_tokens(encoder, world_dir, s, cache, progress)
              for s in ("train", "val", "test")}
    mean = splits["train"][0].mean(0)
    std = splits["train"][0].std(0) + 1e-4
    feats = {s: (v[0] - mean) / std for s, v in splits.items()}
    counts = {s: v[1].clamp(max=config.max_count) for s, v in splits.items()}
    tasks = {"presence": ({s: (c > 0).long() for s, c in counts.items()}, 2),
             "count": (counts, config.max_count + 1)}
    night = splits["test"][2]
    result: dict = {"kind": encoder.kind, "fingerprint": encoder.fingerprint()[:16],
                    "tokens": [encoder.num_tokens, encoder.dim], "tasks": {}}
    for task, (targets, n_classes) in tasks.items():
        best = None
        for wd in config.weight_decays:
            probe = fit_linear_probe(feats["train"], targets["train"], n_classes, wd, config)
            val = float((_predict(probe, feats["val"], n_classes) == targets["val"])
                        .float().mean())
            if best is None or val > best[0]:
                best = (val, wd, probe)
        val_acc, wd, probe = best
        majority = torch.mode(targets["train"], dim=0).values  # (C,)
        correct = _predict(probe, feats["test"], n_classes) == targets["test"]  # (N, C)
        base = targets["test"] == majority
        entry = {"weight_decay": wd, "val_accuracy": round(val_acc, 4)}
        for light, mask in (("all", torch.ones_like(night)), ("day", ~night), ("night", night)):
            if not mask.any():
                continue
            entry[light] = {
                "frames": int(mask.sum()),
                "accuracy": round(float(correct[mask].float().mean()), 4),
                "majority": round(float(base[mask].float().mean()), 4),
                "per_class": {name: round(float(correct[mask, i].float().mean()), 4)
                              for i, name in enumerate(CLASS_NAMES)},
            }
        result["tasks"][task] = entry
    return result


def run_probes(world_dir: str | os.PathLike[str], kinds: list[str],
               store_dir: str | os.PathLike[str] | None = None,
               config: ProbeConfig | None = None, use_cache: bool = True,
               progress: bool = True) -> dict:
    """Probe each pretrained encoder of ``kinds`` (pretraining it first if needed)."""
    config = config or ProbeConfig()
    cache = FeatureCache(model_store_dir(store_dir) / "features") if use_cache else None
    results = [probe_encoder(ensure_pretrained(k, world_dir, store_dir, progress=progress),
                             world_dir, config, cache, progress) for k in kinds]
    return {"world": str(Path(world_dir)), "probe": asdict(config), "encoders": results}


def to_markdown(report: dict) -> str:
    """Summary tables of :func:`run_probes` output."""
    lines = ["# Linear probes on frozen encoder tokens", "",
             f"World: `{report['world']}` (train split fits, val picks weight decay, test "
             "scores). Accuracy is the mean over the 10 classes; *majority* answers each class "
             "with its most common train value.", "",
             "| encoder | light | test frames | presence acc | majority | count acc (0-3+) "
             "| majority |", "|---|---|---|---|---|---|---|"]
    for enc in report["encoders"]:
        for light in ("day", "night"):
            p, c = enc["tasks"]["presence"].get(light), enc["tasks"]["count"].get(light)
            if p is None:
                continue
            lines.append(f"| {enc['kind']} | {light} | {p['frames']} | {p['accuracy']:.3f} | "
                         f"{p['majority']:.3f} | {c['accuracy']:.3f} | {c['majority']:.3f} |")
    lines += ["", "Presence accuracy per class (test):", "",
              "| class | " + " | ".join(f"{e['kind']} {light}" for e in report["encoders"]
                                         for light in ("day", "night")) + " |",
              "|---|" + "---|" * (2 * len(report["encoders"]))]
    for name in CLASS_NAMES:
        cells = []
        for enc in report["encoders"]:
            for light in ("day", "night"):
                entry = enc["tasks"]["presence"].get(light)
                cells.append(f"{entry['per_class'][name]:.2f}" if entry else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
