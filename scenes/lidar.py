"""A spinning 32-beam LiDAR ray-cast into a scene (unaffected by light).

The beams sit at the pixel centres of :func:`scenes.range_image.points_to_range_image`
(32 rows from +10 deg to -30 deg, ``width`` azimuth columns), so every return lands in its own
range-image pixel. Points are returned in the sensor frame (origin at the LiDAR, which is
mounted :data:`LIDAR_HEIGHT` metres above the road) as ``float32 (N, 4)``: x, y, z, intensity.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from scenes import layout as L
from scenes.raycast import ENV_REFLECTIVITY, boxes_to_arrays, intersect_boxes, intersect_environment

LIDAR_HEIGHT = 1.84  # metres, as nuScenes' LIDAR_TOP
FOV_UP_DEG, FOV_DOWN_DEG = 10.0, -30.0
MAX_RANGE = 70.0
RANGE_NOISE_M = 0.02
INTENSITY_NOISE = 0.03


@dataclass
class LidarSweep:
    points: np.ndarray  # float32 (N, 4), sensor frame
    hits_per_object: np.ndarray  # int (num objects,) returns on each box


@lru_cache(maxsize=8)
def beam_directions(beams: int, width: int) -> np.ndarray:
    """Unit directions (beams * width, 3), row-major as the range image (row 0 = top beam)."""
    pitch = np.radians(FOV_UP_DEG - (np.arange(beams) + 0.5) * (FOV_UP_DEG - FOV_DOWN_DEG)
                       / beams)
    yaw = np.pi * (1.0 - 2.0 * (np.arange(width) + 0.5) / width)
    p, y = np.meshgrid(pitch, yaw, indexing="ij")
    dirs = np.stack([np.cos(p) * np.cos(y), np.cos(p) * np.sin(y), np.sin(p)], axis=-1)
    dirs = dirs.reshape(-1, 3)
    dirs.setflags(write=False)
    return dirs


def cast_lidar(scene: L.SceneLayout, time_s: float, rng: np.random.Generator,
               beams: int = 32, width: int = 512) -> LidarSweep:
    """One sweep at ``time_s``: ranges and intensities from the boxes and the environment."""
    dirs = beam_directions(beams, width)
    origin = np.array([0.0, 0.0, LIDAR_HEIGHT])
    ego_x = scene.ego_x(time_s)
    annotations = scene.annotations_at(time_s)
    centers, half, yaws = boxes_to_arrays(
        [a.center for a in annotations], [a.size for a in annotations],
        [a.yaw for a in annotations])
    boxes = intersect_boxes(origin, dirs, centers, half, yaws, MAX_RANGE)
    env = intersect_environment(origin, dirs, ego_x, scene, MAX_RANGE)
    on_box = boxes.t < env.t
    t = np.where(on_box, boxes.t, env.t)
    keep = np.isfinite(t) & (t <= MAX_RANGE)
    reflect_obj = np.array([L.CLASSES[a.category].reflectivity for a in annotations] + [0.0])
    reflect = np.where(on_box, reflect_obj[boxes.index], ENV_REFLECTIVITY[env.material])
    # Incidence: grazing returns are weaker.
    cos_inc = np.where(on_box, 0.8, np.abs(dirs[:, 2]) * env.normal_z + 0.3 * (1 - env.normal_z))
    intensity = reflect * (0.6 + 0.4 * np.clip(cos_inc, 0, 1))
    noise_t = rng.normal(0.0, RANGE_NOISE_M, size=len(t))
    noise_i = rng.normal(0.0, INTENSITY_NOISE, size=len(t))
    t = t[keep] + noise_t[keep]
    points = np.empty((int(keep.sum()), 4), dtype=np.float32)
    points[:, :3] = dirs[keep] * t[:, None]
    points[:, 3] = np.clip(intensity[keep] + noise_i[keep], 0.0, 1.0)
    hit_ids = boxes.index[on_box & keep]
    counts = np.bincount(hit_ids, minlength=len(annotations)) if len(annotations) else \
        np.zeros(0, dtype=np.int64)
    return LidarSweep(points, counts)
