"""The six-view camera rig and a vectorised numpy renderer with a continuous light level.

Every pixel is a pinhole ray cast into the scene (:mod:`scenes.raycast`), so depth ordering
is exact. Surfaces get a per-class paint (windows, wheels, stripes, lights, riders), then a
light model: ambient daylight scaled by ``light`` (1 day .. 0 night, warm at dusk), the ego's
headlight cones in front, street lamps, and emissive vehicle lights. The sensor then applies
exposure, shot/read noise and blur that grow as the light falls, so night really hurts.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from scenes import layout as L
from scenes.raycast import (
    KERB,
    PAINT,
    ROAD,
    SIDEWALK,
    SKY,
    WALL,
    boxes_to_arrays,
    intersect_boxes,
    intersect_environment,
)
from scenes.sample import CAMERA_VIEWS

CAMERA_HEIGHT = 1.5
#: View name -> (yaw in degrees, horizontal field of view in degrees), as the nuScenes rig.
RIG: dict[str, tuple[float, float]] = {
    "CAM_FRONT": (0.0, 70.0),
    "CAM_FRONT_RIGHT": (-55.0, 70.0),
    "CAM_BACK_RIGHT": (-110.0, 70.0),
    "CAM_BACK": (180.0, 110.0),
    "CAM_BACK_LEFT": (110.0, 70.0),
    "CAM_FRONT_LEFT": (55.0, 70.0),
}
MAX_RANGE = 120.0
SUN = np.array([0.4, 0.3, 0.86]) / np.linalg.norm([0.4, 0.3, 0.86])
LAMP_SPACING = 25.0  # street lamps along the left kerb, metres
LAMP_RADIUS = 7.0

_ENV_ALBEDO = {
    ROAD: (0.32, 0.32, 0.34), PAINT: (0.92, 0.92, 0.88), KERB: (0.7, 0.7, 0.68),
    SIDEWALK: (0.62, 0.6, 0.56),
}
_GLASS = np.array([0.12, 0.16, 0.22])
_TYRE = np.array([0.05, 0.05, 0.05])


@lru_cache(maxsize=4)
def rig_directions(height: int, width: int) -> np.ndarray:
    """Unit ray directions (6 * H * W, 3) for the views in :data:`CAMERA_VIEWS` order."""
    out = []
    for view in CAMERA_VIEWS:
        yaw_deg, hfov_deg = RIG[view]
        yaw = np.radians(yaw_deg)
        focal = (width / 2) / np.tan(np.radians(hfov_deg) / 2)
        u = (np.arange(width) + 0.5 - width / 2) / focal
        v = (np.arange(height) + 0.5 - height / 2) / focal
        uu, vv = np.meshgrid(u, v)  # (H, W): right, down
        forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
        up = np.array([0.0, 0.0, 1.0])
        d = forward[None, None] + uu[..., None] * right + (-vv[..., None]) * up
        out.append(d.reshape(-1, 3))
    dirs = np.concatenate(out)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    dirs.setflags(write=False)
    return dirs


def _face_coords(local: np.ndarray, half: np.ndarray, face: np.ndarray):
    """(a, v) in [0, 1] on the hit face: a along the face (rear->front or right->left), v up."""
    rel = (local + half) / (2 * half)  # each axis in [0, 1]
    side = (face == 2) | (face == 3)
    a = np.where(side, rel[:, 0], rel[:, 1])
    v = np.where(face == 4, rel[:, 1], rel[:, 2])
    a = np.where(face == 4, rel[:, 0], a)
    return np.clip(a, 0, 1), np.clip(v, 0, 1)


def _paint_objects(categories, statuses, colours, lights, face, a, v, light):
    """Albedo and emitted light (each (R, 3)) of box hits, painted per class."""
    n = len(face)
    albedo = colours.copy()
    emit = np.zeros((n, 3))
    side = (face == 2) | (face == 3)
    front, rear, top = face == 0, face == 1, face == 4
    is_ = {name: categories == name for name in L.CLASS_NAMES}
    vehicle = is_["car"] | is_["truck"] | is_["bus"] | is_["construction vehicle"]
    # Windows.
    car_win = is_["car"] & (v > 0.55) & (v < 0.88) & ((side & (a > 0.2) & (a < 0.8))
                                                       | ((front | rear) & (a > 0.1) & (a < 0.9)))
    bus_win = is_["bus"] & (v > 0.5) & (v < 0.85) & (side | front) & (a > 0.04) & (a < 0.96)
    cab = is_["truck"] | is_["construction vehicle"]
    cab_win = cab & (v > 0.6) & (v < 0.85) & ((side & (a > 0.8) & (a < 0.96)) | front)
    albedo[car_win | bus_win | cab_win] = _GLASS
    # Stripes: hazard chevrons on construction vehicles, ribs on trailers.
    chevron = is_["construction vehicle"] & side & (v < 0.5) & (np.mod(a * 8 + v * 2, 1) < 0.45)
    albedo[chevron] = (0.08, 0.08, 0.08)
    ribs = is_["trailer"] & side & (np.mod(a * 14, 1) < 0.12)
    albedo[ribs] *= 0.6
    # Wheels on every road vehicle's sides.
    wheel_zone = (a < 0.25) & (a > 0.08) | (a > 0.75) & (a < 0.92)
    big = vehicle | is_["trailer"]
    albedo[big & side & (v < 0.22) & wheel_zone] = _TYRE
    # Head and tail lights: lit for vehicles in traffic; brake lights bright when stopped.
    lamp = (v > 0.3) & (v < 0.45) & ((a < 0.16) | (a > 0.84)) & (vehicle | is_["trailer"])
    tail, head = lamp & rear, lamp & front & ~is_["trailer"]
    albedo[tail] = (0.6, 0.05, 0.05)
    albedo[head] = (0.9, 0.9, 0.8)
    braking = tail & (statuses == "stopped")
    emit[tail & lights] = (0.9, 0.05, 0.02)
    emit[braking] = (2.2, 0.15, 0.05)
    emit[head & lights] = (1.6, 1.5, 1.2)
    # Pedestrians: head, shirt (body colour), trousers.
    ped = is_["pedestrian"]
    albedo[ped & (v < 0.47)] = (0.12, 0.12, 0.2)
    albedo[ped & (v > 0.86)] = (0.85, 0.65, 0.5)
    stride = ped & (statuses == "moving") & (v < 0.47) & (np.abs(a - 0.5) < 0.12) & side
    albedo[stride] = colours[stride] * 0.3 + 0.35  # daylight between the legs
    # Cycles: wheels and frame; the rider (upper part) wears a jacket and helmet.
    cycle = is_["bicycle"] | is_["motorcycle"]
    ridden = cycle & (statuses == "with rider")
    frame_top = np.where(ridden, 1.0 / (1.0 + L.RIDER_HEIGHT_GAIN / 1.1), 1.0)
    vb = v / frame_top  # height within the cycle itself
    wheel = cycle & side & (((a - 0.2) ** 2 + (vb - 0.3) ** 2 < 0.04)
                            | ((a - 0.8) ** 2 + (vb - 0.3) ** 2 < 0.04))
    albedo[is_["bicycle"] & ~wheel & (v < frame_top)] = colours[is_["bicycle"] & ~wheel
                                                                 & (v < frame_top)] * 0.5 + 0.4
    engine = is_["motorcycle"] & side & (vb > 0.25) & (vb < 0.6) & (a > 0.3) & (a < 0.7)
    albedo[engine] = (0.75, 0.75, 0.8)
    albedo[wheel] = _TYRE
    rider = ridden & (v >= frame_top)
    albedo[rider] = (0.25, 0.25, 0.3)
    albedo[rider & (v > 0.9)] = (0.95, 0.95, 0.95)  # helmet
    moto_light = is_["motorcycle"] & front & (np.abs(a - 0.5) < 0.2) & (vb > 0.5) & (vb < 0.7)
    emit[moto_light & lights] = (1.6, 1.5, 1.2)
    # Cones: orange with white bands; barriers: red and white blocks.
    cone = is_["traffic cone"]
    albedo[cone & (((v > 0.55) & (v < 0.7)) | ((v > 0.3) & (v < 0.4)))] = (0.95, 0.95, 0.95)
    barrier = is_["barrier"] & (np.mod(np.floor(a * 3) + np.floor(v * 3), 2) == 1)
    albedo[barrier] = (0.95, 0.95, 0.95)
    albedo[top & big] *= 0.8
    return albedo, emit


def _illumination(points: np.ndarray, normal_z: np.ndarray, light: float, ego_x: float,
                  dirs: np.ndarray) -> np.ndarray:
    """Incoming light (R, 3) at surface points (ego frame)."""
    sun_colour = np.array([1.0, 1.0, 1.0]) * light ** 1.7  # perceived light is not linear
    if 0.15 < light < 0.7:  # dusk: warm low sun
        sun_colour = sun_colour * np.array([1.1, 0.85, 0.65])
    lambert = 0.55 + 0.45 * np.clip(normal_z * SUN[2] + (1 - normal_z) * 0.5, 0, 1)
    ambient = sun_colour[None, :] * lambert[:, None] + 0.002
    # Ego headlights: two cones forward from the bumper, fading with distance.
    rel = points - np.array([2.0, 0.0, 0.7])
    dist = np.linalg.norm(rel, axis=1) + 1e-6
    cos_beam = rel[:, 0] / dist
    cone = np.clip((cos_beam - np.cos(np.radians(28))) / (1 - np.cos(np.radians(28))), 0, 1)
    head = 0.5 * cone ** 0.7 * np.clip(6.0 / dist, 0, 1) ** 1.3 * (rel[:, 2] < 1.5)
    # Street lamps: pools of light on the left side every LAMP_SPACING metres.
    wx = points[:, 0] + ego_x
    lamp_x = np.round(wx / LAMP_SPACING) * LAMP_SPACING
    d2 = (wx - lamp_x) ** 2 + (points[:, 1] - L.ROAD_LEFT_EDGE - 0.5) ** 2
    lamps = 0.12 * np.exp(-d2 / LAMP_RADIUS ** 2) * (points[:, 2] < 5.0)
    warm = np.array([1.0, 0.85, 0.6])
    # Artificial light only matters once daylight fades (it is tiny against the sun).
    artificial = (head + lamps) * (1.0 - light) ** 2
    return ambient + artificial[:, None] * warm[None, :]


def _sky(dirs: np.ndarray, light: float) -> np.ndarray:
    elevation = np.clip(dirs[:, 2], 0, 1)[:, None]
    day_top, day_horizon = np.array([0.35, 0.55, 0.9]), np.array([0.75, 0.85, 0.95])
    dusk_horizon = np.array([0.95, 0.6, 0.35])
    horizon = day_horizon if light >= 0.7 else dusk_horizon * (light / 0.7) + \
        day_horizon * (1 - light / 0.7) * light
    sky = (horizon[None] * (1 - elevation * 2).clip(0, 1) + day_top[None] * (elevation * 2)
           .clip(0, 1)) * light ** 1.7
    return sky + np.array([0.004, 0.004, 0.012])[None]


def _box_blur(img: np.ndarray, radius: int, axis: int) -> np.ndarray:
    if radius <= 0:
        return img
    pad = [(0, 0)] * img.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(img, pad, mode="edge")
    csum = np.cumsum(padded, axis=axis)
    csum = np.concatenate([np.zeros_like(np.take(csum, [0], axis=axis)), csum], axis=axis)
    size = img.shape[axis]
    hi = np.take(csum, np.arange(2 * radius + 1, 2 * radius + 1 + size), axis=axis)
    lo = np.take(csum, np.arange(0, size), axis=axis)
    return (hi - lo) / (2 * radius + 1)


def render_views(scene: L.SceneLayout, time_s: float, light: float, height: int, width: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Render the six views at ``time_s`` under ``light``; returns view -> uint8 (H, W, 3)."""
    dirs = rig_directions(height, width)
    origin = np.array([0.0, 0.0, CAMERA_HEIGHT])
    ego_x = scene.ego_x(time_s)
    anns = scene.annotations_at(time_s)
    centers, half, yaws = boxes_to_arrays([a.center for a in anns], [a.size for a in anns],
                                          [a.yaw for a in anns])
    boxes = intersect_boxes(origin, dirs, centers, half, yaws, MAX_RANGE)
    env = intersect_environment(origin, dirs, ego_x, scene, MAX_RANGE)
    n = len(dirs)
    albedo = np.zeros((n, 3))
    emit = np.zeros((n, 3))
    for material, colour in _ENV_ALBEDO.items():
        albedo[env.material == material] = colour
    # Walls: block colour with a grid of windows, some lit at night.
    wall = env.material == WALL
    if wall.any():
        p = env.point[wall]
        wx = p[:, 0] + ego_x
        side = (p[:, 1] > 0).astype(np.int64)
        block = np.clip(np.floor(wx / L.BLOCK_LENGTH).astype(np.int64) - scene.block_offset,
                        0, scene.wall_colours.shape[1] - 1)
        colour = scene.wall_colours[side, block]
        col_i, row_i = np.floor(wx / 2.0).astype(np.int64), np.floor(p[:, 2] / 3.0)
        window = (np.mod(wx, 2.0) > 0.7) & (np.mod(p[:, 2], 3.0) > 1.0) & (p[:, 2] > 2.5)
        colour[window] = _GLASS
        hashed = (col_i * 73856093 ^ row_i.astype(np.int64) * 19349663
                  ^ scene.lit_window_seed) % 100
        lit = window & (hashed < 25)
        wall_emit = np.zeros_like(colour)
        wall_emit[lit] = (0.9, 0.75, 0.4)
        albedo[wall] = colour
        emit[wall] = wall_emit * 0.3 * max(0.0, 1.0 - 1.5 * light)
    # Faint asphalt texture so the road is not flat.
    road = env.material == ROAD
    grain = np.sin(env.point[road, 0] * 7.1 + ego_x * 7.1) * np.sin(env.point[road, 1] * 5.3)
    albedo[road] *= (1.0 + 0.05 * grain)[:, None]
    on_box = boxes.t < env.t
    normal_z = env.normal_z.copy()
    if on_box.any():
        idx = boxes.index[on_box]
        cats = np.array([a.category for a in anns])[idx]
        stats = np.array([a.status or "" for a in anns])[idx]
        obj_colours = np.array([o.colour for o in scene.objects])[idx]
        obj_lights = np.array([o.lights_on for o in scene.objects])[idx]
        face = boxes.face[on_box]
        a, v = _face_coords(boxes.local[on_box], half[idx], face)
        obj_albedo, obj_emit = _paint_objects(cats, stats, obj_colours, obj_lights, face, a, v,
                                              light)
        albedo[on_box], emit[on_box] = obj_albedo, obj_emit
        normal_z[on_box] = np.where(face == 4, 1.0, 0.0)
    t = np.where(on_box, boxes.t, env.t)
    points = origin[None] + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs
    radiance = albedo * _illumination(points, normal_z, light, ego_x, dirs) + emit
    fog = np.clip(np.where(np.isfinite(t), t, MAX_RANGE) / MAX_RANGE, 0, 1)[:, None] ** 1.5
    sky = _sky(dirs, light)
    radiance = radiance * (1 - fog) + sky * fog
    escaped = ~np.isfinite(t) & (env.material == SKY)
    radiance[escaped] = sky[escaped]
    return _sensor(radiance.reshape(len(CAMERA_VIEWS), height, width, 3), light, rng)


def _sensor(radiance: np.ndarray, light: float, rng: np.random.Generator) -> dict:
    """Exposure, blur, noise and quantisation; worse in the dark."""
    gain = 1.0 / max(light, 0.05) ** 0.5  # auto-exposure only partly compensates
    img = radiance * gain
    darkness = 1.0 - light
    h = img.shape[1]
    blur = int(round(darkness ** 2 * h / 40))  # long exposure: motion + defocus blur
    img = _box_blur(img, blur, axis=2)
    img = _box_blur(img, blur // 2, axis=1)
    sigma = 0.006 + 0.03 * darkness ** 2
    shot = np.sqrt(np.clip(img, 0, None)) * 0.05 * darkness ** 2
    luma = rng.normal(0.0, 1.0, img.shape[:-1] + (1,))
    chroma = rng.normal(0.0, 0.5, img.shape)
    img = img + (luma + chroma) * (sigma + shot)
    img = np.clip(img, 0, 1) ** (1 / 1.8)  # display gamma
    out = (img * 255 + 0.5).astype(np.uint8)
    return {view: out[i] for i, view in enumerate(CAMERA_VIEWS)}
