"""Linear probes: do the frozen tokens carry the scene?

The tokens of both encoders belong to *regions* around the vehicle: camera tokens to views,
LiDAR tokens to azimuth bands. A linear probe reads the tokens of one region (its blocks
concatenated, standardised) and predicts what is in that region: (a) for each class, whether
an object of it is there (all annotated objects, up to 40 m; and only those within 20 m);
(b) per *shape group* (classes of one shape merged, what geometry alone can count) how many
objects (0, 1, 2, 3+); (c) how many objects in each distance ring; (d) object level: the
region's nearest object's class, status and direction (or "nothing").
Probes are fit on the train split of the world (L2 penalty chosen on val) and scored on the
test split (split by scene), separately for day and night frames, next to answering each
target with its most common train value (*majority*).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from encoders.cache import FeatureCache, encode_frames
from encoders.pretrain import load_split, region_layout, stored_or_pretrained
from encoders.targets import (
    CLASS_SLICE,
    DISTANCE_RINGS,
    RING_SLICE,
    SHAPE_GROUPS,
    STATUS_NAMES,
    STATUS_SLICE,
    region_counts,
    slot_targets,
)
from mpnp.paths import model_store_dir
from scenes.layout import CLASS_NAMES
from scenes.questions import RELATIONS

log = logging.getLogger(__name__)

RING_NAMES = tuple(f"{lo:g}-{hi:g} m" for lo, hi in zip((0.0,) + DISTANCE_RINGS, DISTANCE_RINGS))
GROUP_NAMES = tuple(" / ".join(g) for g in SHAPE_GROUPS)
#: The near range of the second presence task: objects the sensors resolve well.
NEAR_METRES = 20.0
#: Light levels the test scenes are rendered at again for a paired day / night comparison.
RELIT_LIGHTS = {"relit day": 1.0, "relit night": 0.05}


@dataclass
class ProbeConfig:
    """Linear probe training.

    Attributes:
        max_count: counts are clipped to this (classes 0..max_count).
        weight_decays: L2 penalties to try; the best on the val split is kept.
        steps / lr: full-batch Adam steps.
        seed: head initialisation.
    """

    max_count: int = 3
    weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    steps: int = 200
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
    optimizer = torch.optim.Adam(probe.parameters(), lr=config.lr)
    for _ in range(config.steps):
        logits = probe(features).reshape(len(features), -1, n_classes)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss = loss + weight_decay * probe.weight.square().sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()


def balanced_accuracy(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over targets (columns) of the mean recall over the classes present in that column:
    answering every sample with one value scores 1 / (classes present), whatever the
    imbalance, so it separates real information from a skewed prior."""
    scores = []
    for col in range(targets.shape[1]):
        t, p = targets[:, col], predicted[:, col]
        recalls = [float((p[t == c] == c).float().mean()) for c in torch.unique(t)]
        scores.append(sum(recalls) / len(recalls))
    return sum(scores) / len(scores)


def _predict(probe: nn.Linear, features: torch.Tensor, n_classes: int) -> torch.Tensor:
    with torch.no_grad():
        return probe(features).reshape(len(features), -1, n_classes).argmax(-1)


def _region_data(encoder, frames: list, tokens: torch.Tensor, max_count: int):
    """Per-region features ``(N*R, k*D)``, targets per task and night flags ``(N*R,)`` of
    ``frames`` whose tokens are ``tokens`` ``(N, T, D)``."""
    regions, n_regions = region_layout(encoder)
    features = tokens.reshape(len(frames) * n_regions, -1)  # (N*R, k*D): region-major tokens
    counts = region_counts(frames, regions, n_regions, max_count=10**6)
    counts = torch.from_numpy(counts).reshape(len(frames) * n_regions, -1)
    near = region_counts(frames, regions, n_regions, max_count=1, max_distance=NEAR_METRES)
    near = torch.from_numpy(near).reshape(len(frames) * n_regions, -1)[:, CLASS_SLICE]
    classes = counts[:, CLASS_SLICE]
    groups = torch.stack([classes[:, [CLASS_NAMES.index(n) for n in g]].sum(1)
                          for g in SHAPE_GROUPS], dim=1)
    nearest = torch.from_numpy(slot_targets(frames, regions, n_regions, 1)).reshape(
        len(frames) * n_regions, -1)  # (N*R, fields): the region's nearest object
    empty = nearest[:, 0] == len(CLASS_NAMES)
    targets = {"class presence": (classes > 0).long(),
               f"class presence <= {NEAR_METRES:g} m": near,
               "shape-group count": groups.clamp(max=max_count),
               "objects by distance": counts[:, RING_SLICE].clamp(max=max_count),
               "status count": counts[:, STATUS_SLICE].clamp(max=max_count),
               # "nothing" is the last value of each object-level task.
               "nearest object class": nearest[:, :1],
               "nearest object status": torch.where(empty, len(STATUS_NAMES) + 1,
                                                    nearest[:, 1])[:, None],
               "nearest object direction": torch.where(empty, len(RELATIONS),
                                                       nearest[:, 3])[:, None]}
    night = torch.tensor([f.is_night for f in frames]).repeat_interleave(n_regions)
    return features, targets, night


def _split_regions(encoder, world_dir, split: str, cache: FeatureCache | None,
                   progress: bool, max_count: int):
    data = load_split(world_dir, split)
    ids = data.frame_ids
    frames = {i: data.frame(i) for i in ids}  # read each file once
    tokens = encode_frames(encoder, ids, frames.__getitem__, cache, progress=progress,
                           key_of=data.cache_key)
    return _region_data(encoder, list(frames.values()), torch.stack([tokens[i] for i in ids]),
                        max_count)


def relit_test_frames(world_dir: str | os.PathLike[str], lights: dict[str, float]
                      ) -> dict[str, list]:
    """The test split of a synthetic world rendered again at each light level: the same
    objects and LiDAR sweeps, only the light differs, so day and night compare directly."""
    from scenes.storage import read_manifest
    from scenes.synthetic import SyntheticWorld, WorldConfig

    manifest = read_manifest(Path(world_dir))
    if manifest.get("source") != "synthetic":
        return {}
    world = SyntheticWorld(WorldConfig.from_dict(manifest["config"]))
    ids = load_split(world_dir, "test").frame_ids
    out = {}
    for name, light in lights.items():
        frames = []
        for frame_id in ids:
            scene_id, index = frame_id.rsplit("-", 1)
            frames.append(world.make_frame(scene_id, int(index), light)[0])
        out[name] = frames
    return out


def probe_encoder(encoder, world_dir, config: ProbeConfig | None = None,
                  cache: FeatureCache | None = None, progress: bool = True,
                  relit: dict[str, list] | None = None) -> dict:
    """Probe accuracies of one frozen encoder (see the module docstring); ``relit`` adds
    scores on re-rendered test frames (:func:`relit_test_frames`)."""
    config = config or ProbeConfig()
    splits = {s: _split_regions(encoder, world_dir, s, cache, progress, config.max_count)
              for s in ("train", "val", "test")}
    mean = splits["train"][0].mean(0)
    std = splits["train"][0].std(0) + 1e-4
    feats = {s: (v[0] - mean) / std for s, v in splits.items()}
    night = splits["test"][2]
    relit_data = {}
    for name, frames in (relit or {}).items():
        tokens = torch.cat([encoder.encode(frames[i:i + 16]).cpu()
                            for i in range(0, len(frames), 16)])
        f, t, _ = _region_data(encoder, frames, tokens, config.max_count)
        relit_data[name] = ((f - mean) / std, t)
    names = {"class presence": CLASS_NAMES, f"class presence <= {NEAR_METRES:g} m": CLASS_NAMES,
             "shape-group count": GROUP_NAMES,
             "objects by distance": RING_NAMES, "status count": STATUS_NAMES,
             "nearest object class": ("nearest",), "nearest object status": ("nearest",),
             "nearest object direction": ("nearest",)}
    values = {"nearest object class": len(CLASS_NAMES) + 1,
              "nearest object status": len(STATUS_NAMES) + 2,
              "nearest object direction": len(RELATIONS) + 1}
    regions, n_regions = region_layout(encoder)
    result: dict = {"kind": encoder.kind, "fingerprint": encoder.fingerprint()[:16],
                    "tokens": [encoder.num_tokens, encoder.dim], "regions": regions,
                    "tasks": {}}
    for task, target_names in names.items():
        targets = {s: v[1][task] for s, v in splits.items()}
        n_classes = values.get(task, 2 if task.startswith("class presence")
                               else config.max_count + 1)
        best = None
        for wd in config.weight_decays:
            probe = fit_linear_probe(feats["train"], targets["train"], n_classes, wd, config)
            val = float((_predict(probe, feats["val"], n_classes) == targets["val"])
                        .float().mean())
            if best is None or val > best[0]:
                best = (val, wd, probe)
        val_acc, wd, probe = best
        majority = torch.mode(targets["train"], dim=0).values  # (C,)
        predicted = _predict(probe, feats["test"], n_classes)  # (N*R, C)
        correct = predicted == targets["test"]
        base = targets["test"] == majority
        entry = {"l2": wd, "val_accuracy": round(val_acc, 4)}
        for light, mask in (("all", torch.ones_like(night)), ("day", ~night), ("night", night)):
            if not mask.any():
                continue
            entry[light] = {
                "frames": int(mask.sum()) // n_regions,
                "accuracy": round(float(correct[mask].float().mean()), 4),
                "majority": round(float(base[mask].float().mean()), 4),
                "balanced_accuracy": round(balanced_accuracy(predicted[mask],
                                                             targets["test"][mask]), 4),
                "majority_balanced_accuracy": round(balanced_accuracy(
                    majority.expand_as(predicted[mask]), targets["test"][mask]), 4),
                "per_target": {name: round(float(correct[mask, i].float().mean()), 4)
                               for i, name in enumerate(target_names)},
            }
        for name, (f, t) in relit_data.items():
            hits = _predict(probe, f, n_classes) == t[task]
            entry[name] = {"frames": len(f) // n_regions,
                           "accuracy": round(float(hits.float().mean()), 4),
                           "majority": round(float((t[task] == majority).float().mean()), 4),
                           "balanced_accuracy": round(balanced_accuracy(
                               _predict(probe, f, n_classes), t[task]), 4)}
        result["tasks"][task] = entry
    return result


def run_probes(world_dir: str | os.PathLike[str], kinds: list[str],
               store_dir: str | os.PathLike[str] | None = None,
               config: ProbeConfig | None = None, use_cache: bool = True,
               progress: bool = True, random_baseline: bool = True) -> dict:
    """Probe each encoder of ``kinds`` the store holds, as it is (pretraining one with the
    defaults only where the store has none: :func:`stored_or_pretrained`) and, with
    ``random_baseline``, a randomly initialised encoder of the same config next to it."""
    from encoders import create_encoder

    config = config or ProbeConfig()
    cache = FeatureCache(model_store_dir(store_dir) / "features") if use_cache else None
    relit = relit_test_frames(world_dir, RELIT_LIGHTS)
    results = []
    for kind in kinds:
        encoder = stored_or_pretrained(kind, world_dir, store_dir, progress=progress)
        results.append(probe_encoder(encoder, world_dir, config, cache, progress, relit))
        if random_baseline:
            fresh = create_encoder(kind, **encoder.config_dict()).freeze()
            row = probe_encoder(fresh, world_dir, config, None, progress, relit)
            row["kind"] = f"{kind} (random init)"
            results.append(row)
    return {"world": str(Path(world_dir)), "probe": asdict(config), "encoders": results}


def to_markdown(report: dict) -> str:
    """Summary tables of :func:`run_probes` output."""
    tasks = list(report["encoders"][0]["tasks"]) if report["encoders"] else []
    lines = ["# Linear probes on frozen encoder tokens", "",
             f"World: `{report['world']}`. A linear probe per task reads the frozen tokens of "
             "one region (camera: a view; LiDAR: an azimuth band) and predicts what is in it; "
             "fit on the train split, L2 penalty picked on val, scored on the test split "
             "(split by scene). Accuracy is the mean over regions and the task's targets; "
             "*maj.* answers each target with its most common train value. Counts are 0, 1, "
             "2, 3+. Shape groups merge the classes that share one shape (" + "; ".join(
                 " / ".join(g) for g in SHAPE_GROUPS if len(g) > 1) + "): geometry alone "
             "can count these groups but cannot tell their members apart.", "",
             "| encoder | light | test frames | " + " | ".join(
                 f"{t} | maj." for t in tasks) + " |",
             "|---|---|---|" + "---|---|" * len(tasks)]
    for enc in report["encoders"]:
        for light in ("day", "night"):
            first = enc["tasks"][tasks[0]].get(light)
            if first is None:
                continue
            cells = [f"{enc['tasks'][t][light]['accuracy']:.3f} | "
                     f"{enc['tasks'][t][light]['majority']:.3f}" for t in tasks]
            lines.append(f"| {enc['kind']} | {light} | {first['frames']} | "
                         + " | ".join(cells) + " |")
    lines += ["", "Balanced accuracy (mean recall over the values present; majority scores "
              "1 / values present):", "",
              "| encoder | light | " + " | ".join(f"{t} | maj." for t in tasks) + " |",
              "|---|---|" + "---|---|" * len(tasks)]
    for enc in report["encoders"]:
        for light in ("day", "night"):
            if enc["tasks"][tasks[0]].get(light) is None:
                continue
            cells = [f"{enc['tasks'][t][light]['balanced_accuracy']:.3f} | "
                     f"{enc['tasks'][t][light]['majority_balanced_accuracy']:.3f}"
                     for t in tasks]
            lines.append(f"| {enc['kind']} | {light} | " + " | ".join(cells) + " |")
    relit = [k for k in RELIT_LIGHTS if report["encoders"] and
             k in report["encoders"][0]["tasks"][tasks[0]]]
    if relit:
        lights = ", ".join(f"{k} = light {v:g}" for k, v in RELIT_LIGHTS.items())
        lines += ["", f"The same test frames rendered again at two light levels ({lights}): same "
                  "objects and LiDAR sweeps, only the light differs. Accuracy (balanced "
                  "accuracy in brackets); the probes are the ones above.", "",
                  "| encoder | " + " | ".join(f"{t} {k}" for t in tasks for k in relit) + " |",
                  "|---|" + "---|" * (len(tasks) * len(relit))]
        for enc in report["encoders"]:
            cells = [f"{enc['tasks'][t][k]['accuracy']:.3f} "
                     f"({enc['tasks'][t][k]['balanced_accuracy']:.3f})"
                     for t in tasks for k in relit]
            lines.append(f"| {enc['kind']} | " + " | ".join(cells) + " |")
    for task in (t for t in tasks if t.startswith("class presence")):
        lines += ["", f"{task}: accuracy per class (test):", "",
                  "| class | " + " | ".join(f"{e['kind']} {light}" for e in report["encoders"]
                                             for light in ("day", "night")) + " |",
                  "|---|" + "---|" * (2 * len(report["encoders"]))]
        for name in CLASS_NAMES:
            cells = []
            for enc in report["encoders"]:
                for light in ("day", "night"):
                    entry = enc["tasks"][task].get(light)
                    cells.append(f"{entry['per_target'][name]:.2f}" if entry else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
