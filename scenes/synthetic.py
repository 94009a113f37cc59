"""The synthetic day/night driving world: configuration, frame generation and splits.

A world is a set of *scenes* (short drives of ``frames_per_scene`` frames, 0.5 s apart), each
either a day scene (light in ``day_light``; the low end is dusk) or a night scene (light in
``night_light``). Scenes, not frames, are assigned to train/val/test, so no drive appears in
two splits. Everything is a pure function of ``seed`` and the scene id.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from scenes import layout as L
from scenes.camera import render_views
from scenes.lidar import cast_lidar
from scenes.questions import Candidate, candidate_pool, select_balanced, to_qa_items
from scenes.sample import Frame, QAItem

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class WorldConfig:
    """How big and how detailed the synthetic world is.

    Attributes:
        seed: everything is deterministic from it.
        day_frames / night_frames: frames in all splits together.
        frames_per_scene: frames per drive; splits are made by drive.
        questions_per_frame: questions asked about each frame.
        image_height / image_width: per camera view (six views).
        lidar_beams / lidar_width: range-image geometry of the LiDAR (keep 32 beams).
        train_fraction / val_fraction: share of scenes; the test split gets the rest.
        day_light / night_light: ranges the per-scene light level is drawn from.
        max_object_distance: objects further than this (metres) are not annotated or asked.
        min_lidar_points: objects with fewer LiDAR returns are not annotated (occluded).
        density: how crowded scenes are (1.0 ~ 10-25 annotated objects per frame).
    """

    seed: int = 0
    day_frames: int = 400
    night_frames: int = 100
    frames_per_scene: int = 10
    questions_per_frame: int = 10
    image_height: int = 64
    image_width: int = 112
    lidar_beams: int = 32
    lidar_width: int = 512
    train_fraction: float = 0.6
    val_fraction: float = 0.2
    day_light: tuple[float, float] = (0.45, 1.0)
    night_light: tuple[float, float] = (0.0, 0.15)
    max_object_distance: float = 40.0
    min_lidar_points: int = 1
    density: float = 1.0
    extra: dict = field(default_factory=dict)  # free-form notes stored in the manifest

    def __post_init__(self) -> None:
        for name in ("day_frames", "night_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.day_frames + self.night_frames == 0:
            raise ValueError("WorldConfig: day_frames + night_frames must be > 0")
        for name in ("frames_per_scene", "questions_per_frame", "lidar_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_height < 8 or self.image_width < 8:
            raise ValueError(f"WorldConfig: images must be at least 8x8, got "
                             f"{self.image_height}x{self.image_width}")
        if self.lidar_width < 16:
            raise ValueError(f"WorldConfig.lidar_width must be >= 16, got {self.lidar_width}")
        fractions = (self.train_fraction, self.val_fraction)
        if min(fractions) < 0 or sum(fractions) > 1:
            raise ValueError("WorldConfig: train_fraction and val_fraction must be >= 0 and "
                             f"sum to <= 1, got {fractions}")
        self.day_light = tuple(float(v) for v in self.day_light)
        self.night_light = tuple(float(v) for v in self.night_light)
        for name in ("day_light", "night_light"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be 0 <= low <= high <= 1, "
                                 f"got {(lo, hi)}")
        if self.max_object_distance <= 0 or self.density <= 0 or self.min_lidar_points < 0:
            raise ValueError("WorldConfig: max_object_distance and density must be > 0 and "
                             "min_lidar_points >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WorldConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class SceneSpec:
    """One planned scene: its id, how many frames, its light level and split."""

    scene_id: str
    frames: int
    light: float
    split: str

    @property
    def night(self) -> bool:
        return self.light < 0.35


def _stable_seed(*parts: object) -> list[int]:
    return [zlib.crc32(str(p).encode()) for p in parts]


def frame_id_of(scene_id: str, index: int) -> str:
    return f"{scene_id}-{index:03d}"


class SyntheticWorld:
    """Generates frames and questions; every output is a pure function of the config."""

    def __init__(self, config: WorldConfig):
        self.config = config
        self._layout = lru_cache(maxsize=16)(self._make_layout)

    def _make_layout(self, scene_id: str) -> L.SceneLayout:
        rng = np.random.default_rng(_stable_seed(self.config.seed, "layout", scene_id))
        duration = self.config.frames_per_scene * L.FRAME_INTERVAL_S
        return L.sample_scene_layout(rng, scene_id, duration, self.config.density)

    def plan(self) -> list[SceneSpec]:
        """All scenes of the world with their split (day and night scenes in every split)."""
        cfg = self.config
        rng = np.random.default_rng(_stable_seed(cfg.seed, "plan"))
        scenes: list[SceneSpec] = []
        for kind, total, light_range in (("day", cfg.day_frames, cfg.day_light),
                                         ("night", cfg.night_frames, cfg.night_light)):
            n_scenes = math.ceil(total / cfg.frames_per_scene)
            sizes = [cfg.frames_per_scene] * n_scenes
            if n_scenes:
                sizes[-1] = total - cfg.frames_per_scene * (n_scenes - 1)
            splits = _assign_splits(n_scenes, cfg.train_fraction, cfg.val_fraction, rng)
            for i, (size, split) in enumerate(zip(sizes, splits)):
                light = float(rng.uniform(*light_range))
                scenes.append(SceneSpec(f"{kind}-{i:04d}", size, round(light, 4), split))
        return scenes

    def _frame_and_pool(self, scene_id: str, index: int,
                        light: float) -> tuple[Frame, list[Candidate]]:
        cfg = self.config
        scene = self._layout(scene_id)
        t = index * L.FRAME_INTERVAL_S
        lidar_rng = np.random.default_rng(_stable_seed(cfg.seed, "lidar", scene_id, index))
        sweep = cast_lidar(scene, t, lidar_rng, cfg.lidar_beams, cfg.lidar_width)
        camera_rng = np.random.default_rng(_stable_seed(cfg.seed, "camera", scene_id, index))
        cameras = render_views(scene, t, light, cfg.image_height, cfg.image_width, camera_rng)
        objects = [
            ann for ann, hits in zip(scene.annotations_at(t), sweep.hits_per_object)
            if math.hypot(ann.center[0], ann.center[1]) <= cfg.max_object_distance
            and hits >= cfg.min_lidar_points
        ]
        frame = Frame(frame_id=frame_id_of(scene_id, index), scene_id=scene_id,
                      timestamp=round(t, 3), light=float(light), cameras=cameras,
                      lidar=sweep.points, objects=objects)
        return frame, candidate_pool(objects)

    def make_frame(self, scene_id: str, index: int, light: float) -> tuple[Frame, list[QAItem]]:
        """One frame of ``scene_id`` at ``light`` with its questions (balanced within it).

        :func:`generate_world` balances answers across a whole split instead, so the
        questions written to disk can differ from these; frames are identical.
        """
        if not 0.0 <= light <= 1.0:
            raise ValueError(f"light must be in [0, 1], got {light}")
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")
        frame, pool = self._frame_and_pool(scene_id, index, light)
        rng = np.random.default_rng(_stable_seed(self.config.seed, "questions", frame.frame_id))
        picked = select_balanced([pool], self.config.questions_per_frame, rng)[0]
        return frame, to_qa_items(frame.frame_id, picked)


def _assign_splits(n: int, train: float, val: float, rng: np.random.Generator) -> list[str]:
    """Split labels for ``n`` scenes; each non-empty share gets >= 1 scene when n allows."""
    n_val = round(n * val)
    n_test = round(n * (1 - train - val))
    if n >= 3:
        n_val = max(n_val, 1) if val > 0 else 0
        n_test = max(n_test, 1) if train + val < 1 else 0
    n_train = max(n - n_val - n_test, 0)
    labels = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    labels = labels[:n]
    return [labels[i] for i in rng.permutation(len(labels))]


def generate_world(config: WorldConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Generate every split of the world and write it to ``out_dir`` (see scenes/README.md)."""
    from scenes.storage import WorldWriter  # storage imports this module's config type

    world = SyntheticWorld(config)
    writer = WorldWriter(Path(out_dir), config)
    plan = world.plan()
    total = sum(s.frames for s in plan)
    bar = _progress(total, progress)
    for split in SPLITS:
        frames_meta, pools, ids = [], [], []
        for spec in (s for s in plan if s.split == split):
            for index in range(spec.frames):
                frame, pool = world._frame_and_pool(spec.scene_id, index, spec.light)
                frames_meta.append(writer.write_frame(split, frame))
                pools.append(_thin(pool, frame.frame_id, config.seed))
                ids.append(frame.frame_id)
                bar.update(1)
        rng = np.random.default_rng(_stable_seed(config.seed, "balance", split))
        chosen = select_balanced(pools, config.questions_per_frame, rng)
        items = [qa for fid, cands in zip(ids, chosen) for qa in to_qa_items(fid, cands)]
        writer.write_split(split, frames_meta, items)
    bar.close()
    path = writer.finish(plan)
    log.info("wrote %d frames to %s", total, path)
    return path


def _thin(pool: list[Candidate], frame_id: str, seed: int, per_slot: int = 120) -> list[Candidate]:
    """Keep at most ``per_slot`` random candidates per (template, hop) to bound memory."""
    rng = np.random.default_rng(_stable_seed(seed, "thin", frame_id))
    groups: dict[tuple[str, int], list[Candidate]] = {}
    for cand in pool:
        groups.setdefault((cand.template_type, cand.num_hop), []).append(cand)
    out = []
    for group in groups.values():
        if len(group) > per_slot:
            group = [group[i] for i in np.sort(rng.choice(len(group), per_slot, replace=False))]
        out.extend(group)
    return out


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generating frames", unit="frame", disable=not enabled)
