"""Analytic ray casting shared by the camera renderer and the LiDAR.

Both sensors are rays from one origin: the LiDAR's beams and the camera's pixels. Rays are
intersected (vectorised over rays x boxes) with oriented 3D boxes by the slab method and with
the static environment (road plane, raised sidewalks with their kerbs, building walls).
Coordinates are the ego frame of :mod:`scenes.layout` (x forward, y left, z up, road at 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scenes import layout as L

# Environment materials (index into per-material tables of the sensors).
SKY, ROAD, PAINT, KERB, SIDEWALK, WALL = 0, 1, 2, 3, 4, 5
ENV_REFLECTIVITY = np.array([0.0, 0.08, 0.55, 0.15, 0.12, 0.2], dtype=np.float64)


@dataclass
class BoxHits:
    """Nearest box hit per ray (``index == -1`` where no box is hit)."""

    t: np.ndarray  # (R,) distance along the (unit) ray, inf where no hit
    index: np.ndarray  # (R,) box index
    face: np.ndarray  # (R,) 0 front(+x), 1 rear, 2 left(+y), 3 right, 4 top, 5 bottom
    local: np.ndarray  # (R, 3) hit point in the box frame (centre at 0, x along heading)


def boxes_to_arrays(centers, sizes, yaws) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack boxes: centres (B, 3), half extents (B, 3) in (x=length, y=width, z=height), yaws."""
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 3)  # (w, l, h)
    half = np.stack([sizes[:, 1], sizes[:, 0], sizes[:, 2]], axis=1) / 2.0
    return centers, half, np.asarray(yaws, dtype=np.float64).reshape(-1)


def intersect_boxes(origin: np.ndarray, dirs: np.ndarray, centers: np.ndarray,
                    half: np.ndarray, yaws: np.ndarray,
                    max_range: float = np.inf) -> BoxHits:
    """Slab-method intersection of rays ``origin + t * dirs`` with yawed boxes.

    Boxes are visited one by one; each is tested only against the rays inside its azimuth
    interval (seen from ``origin``), which keeps the cost near (rays x boxes per ray).

    Args:
        origin: (3,) shared ray origin (must lie outside every box).
        dirs: (R, 3) unit directions.
        centers, half, yaws: boxes from :func:`boxes_to_arrays`.
        max_range: boxes entirely beyond this distance are skipped.
    """
    n_rays = len(dirs)
    hits = BoxHits(np.full(n_rays, np.inf), np.full(n_rays, -1, dtype=np.int64),
                   np.zeros(n_rays, dtype=np.int64), np.zeros((n_rays, 3)))
    if len(centers) == 0 or n_rays == 0:
        return hits
    azimuth = np.arctan2(dirs[:, 1], dirs[:, 0])  # (R,)
    for b in range(len(centers)):
        rel = centers[b] - origin
        dist_xy = float(np.hypot(rel[0], rel[1]))
        radius = float(np.hypot(half[b, 0], half[b, 1]))
        if dist_xy - radius > max_range:
            continue
        if dist_xy <= radius:
            rays = np.arange(n_rays)
        else:
            spread = np.arcsin(radius / dist_xy) + 1e-3
            diff = np.abs(np.mod(azimuth - np.arctan2(rel[1], rel[0]) + np.pi, 2 * np.pi)
                          - np.pi)
            rays = np.flatnonzero(diff <= spread)
        if len(rays) == 0:
            continue
        cos, sin = np.cos(yaws[b]), np.sin(yaws[b])
        o = -rel
        o_local = np.array([cos * o[0] + sin * o[1], -sin * o[0] + cos * o[1], o[2]])
        d = dirs[rays]
        d_local = np.stack([d[:, 0] * cos + d[:, 1] * sin, -d[:, 0] * sin + d[:, 1] * cos,
                            d[:, 2]], axis=1)  # (r, 3)
        safe = np.where(np.abs(d_local) < 1e-12, 1e-12, d_local)
        t1 = (-half[b] - o_local) / safe
        t2 = (half[b] - o_local) / safe
        t_near_axes = np.minimum(t1, t2)
        t_near = t_near_axes.max(axis=1)
        t_far = np.maximum(t1, t2).min(axis=1)
        better = (t_far >= t_near) & (t_near > 1e-6) & (t_near < hits.t[rays])
        if not better.any():
            continue
        rays, t_near = rays[better], t_near[better]
        axis = t_near_axes[better].argmax(axis=1)  # the slab entered last
        d_hit = d_local[better]
        entering_negative = d_hit[np.arange(len(rays)), axis] > 0
        # Faces: axis 0 -> 0 front / 1 rear; 1 -> 2 left / 3 right; 2 -> 4 top / 5 bottom.
        hits.face[rays] = np.where(entering_negative, 2 * axis + 1, 2 * axis)
        hits.t[rays] = t_near
        hits.index[rays] = b
        hits.local[rays] = o_local[None] + t_near[:, None] * d_hit
    return hits


@dataclass
class EnvHits:
    """Nearest environment hit per ray."""

    t: np.ndarray  # (R,) inf where the ray escapes (sky)
    material: np.ndarray  # (R,) SKY / ROAD / PAINT / KERB / SIDEWALK / WALL
    point: np.ndarray  # (R, 3) hit point in ego coordinates
    normal_z: np.ndarray  # (R,) z component of the surface normal (1 ground, 0 walls)


def _wall_height(heights: np.ndarray, block_offset: int, world_x: np.ndarray) -> np.ndarray:
    block = np.floor(world_x / L.BLOCK_LENGTH).astype(np.int64) - block_offset
    inside = (block >= 0) & (block < len(heights))
    return np.where(inside, heights[np.clip(block, 0, len(heights) - 1)], 0.0)


def intersect_environment(origin: np.ndarray, dirs: np.ndarray, ego_x: float,
                          scene: L.SceneLayout, max_range: float) -> EnvHits:
    """Road, kerbs, sidewalks and building walls of ``scene`` seen from ``origin`` (ego frame)."""
    n = len(dirs)
    ox, oy, oz = origin
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    t = np.full(n, np.inf)
    material = np.zeros(n, dtype=np.int64)
    normal_z = np.ones(n)
    down = dz < -1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        t_road = np.where(down, (0.0 - oz) / dz, np.inf)
        y_road = oy + t_road * dy
        on_road = down & (y_road >= L.ROAD_RIGHT_EDGE) & (y_road <= L.ROAD_LEFT_EDGE)
        t = np.where(on_road, t_road, t)
        material = np.where(on_road, ROAD, material)
        # Rays that cross a road edge: the kerb face if low enough, else the sidewalk top.
        edge_y = np.where(dy < 0, L.ROAD_RIGHT_EDGE, L.ROAD_LEFT_EDGE)
        t_edge = (edge_y - oy) / np.where(np.abs(dy) < 1e-12, 1e-12, dy)
        z_edge = oz + t_edge * dz
        off_road = ~on_road & (t_edge > 0)
        kerb = off_road & (z_edge < L.KERB_HEIGHT) & (z_edge >= 0)
        t = np.where(kerb, t_edge, t)
        material = np.where(kerb, KERB, material)
        normal_z = np.where(kerb, 0.0, normal_z)
        t_walk = np.where(down, (L.KERB_HEIGHT - oz) / dz, np.inf)
        walk = off_road & ~kerb & down & (t_walk > t_edge)
        t = np.where(walk, t_walk, t)
        material = np.where(walk, SIDEWALK, material)
        # Building walls (vertical planes beyond the sidewalks), block by block.
        for wall_y, heights in ((L.WALL_RIGHT_Y, scene.wall_heights_right),
                                (L.WALL_LEFT_Y, scene.wall_heights_left)):
            toward = (dy < 0) if wall_y < oy else (dy > 0)
            t_wall = np.where(toward, (wall_y - oy) / np.where(toward, dy, 1.0), np.inf)
            hit_z = oz + t_wall * dz
            height = _wall_height(heights, scene.block_offset, ego_x + ox + t_wall * dx)
            wall = toward & (hit_z >= L.KERB_HEIGHT) & (hit_z <= height) & (t_wall < t)
            t = np.where(wall, t_wall, t)
            material = np.where(wall, WALL, material)
            normal_z = np.where(wall, 0.0, normal_z)
    beyond = t > max_range
    t = np.where(beyond, np.inf, t)
    material = np.where(beyond, SKY, material)
    point = origin[None, :] + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs
    # Lane paint on the road surface.
    world_x = point[:, 0] + ego_x
    y = point[:, 1]
    dashed = (np.abs(y - L.CENTRE_LINE_Y) < 0.09) & (np.mod(world_x, 6.0) < 3.0)
    solid = np.zeros(n, dtype=bool)
    for line_y in L.EDGE_LINES_Y:
        solid |= np.abs(y - line_y) < 0.08
    paint = (material == ROAD) & (dashed | solid)
    material = np.where(paint, PAINT, material)
    return EnvHits(t, material, point, normal_z)
