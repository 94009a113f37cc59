"""The synthetic world's radars: sparse returns with radial velocity, derived from ground truth.

nuScenes cars carry five radars (front, front left/right, back left/right); so does the
synthetic car. A radar sees few points — here at most :data:`MAX_RETURNS` per radar — but
each carries a **radial velocity**, which is what separates a moving car from a parked or a
stopped one, and radar does not care about light. Every return is a row of
:data:`RADAR_FIELDS`: ``x, y, z`` (ego frame, metres), ``v_radial`` (m/s, ego-motion
compensated as nuScenes' ``vx_comp/vy_comp``: positive = moving away, a parked car reads 0
whether the ego drives or not) and ``rcs`` (radar cross-section, dBsm).

The returns are a deterministic function of a frame's ground-truth objects, its id and its
scene id — never of its light — so a world generated before the radar existed gains it
when its frames are loaded (:func:`radar_payload` is the radar sensor's ``derive``). The
world stores no object speeds; they follow the world's own traffic rules instead
(``scenes/layout.py``): the ego lane and the oncoming lane each flow at one speed per drive
(everything ``moving`` in a lane, and the cycles with riders in a moving lane, move at it),
walking pedestrians at walking pace, everything else stands still.

The noise model (per return): range σ 0.25 m, azimuth σ 0.6°, height σ 0.3 m, velocity
σ 0.15 m/s, RCS σ 2 dB; detection probability falls with distance and is lower for small
objects; a few static clutter returns from the building fronts and rare ghost returns.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import numpy as np

from scenes import layout as L

if TYPE_CHECKING:
    from scenes.sample import Frame

#: The five radars of the rig: name -> (mounting yaw in degrees, 0 = ahead, + = left).
RADARS: dict[str, float] = {
    "RADAR_FRONT": 0.0,
    "RADAR_FRONT_LEFT": 80.0,
    "RADAR_FRONT_RIGHT": -80.0,
    "RADAR_BACK_LEFT": 150.0,
    "RADAR_BACK_RIGHT": -150.0,
}
RADAR_VIEWS: tuple[str, ...] = tuple(RADARS)
RADAR_FIELDS: tuple[str, ...] = ("x", "y", "z", "v_radial", "rcs")
#: Half the horizontal field of view of every radar (degrees) and the detection range (m).
HALF_FOV_DEG = 60.0
MAX_RANGE = 60.0
#: Returns per radar at most (nuScenes' radars report up to 125).
MAX_RETURNS = 64
#: Mean RCS (dBsm) per class.
RCS_DB: dict[str, float] = {
    "car": 10.0, "truck": 16.0, "construction vehicle": 15.0, "bus": 17.0, "trailer": 15.0,
    "pedestrian": -4.0, "bicycle": 0.0, "motorcycle": 4.0, "traffic cone": -6.0,
    "barrier": 2.0,
}
#: Version of this model; the radar encoder's config carries it, so a changed model changes
#: the encoder's fingerprint and no feature cache serves returns of the old model.
RADAR_MODEL_VERSION = 1


def _rng(frame: Frame, what: str) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(f"radar|{what}|{frame.scene_id}".encode()),
                                  zlib.crc32(f"{frame.frame_id}".encode())])


def _lane_speeds(frame: Frame) -> dict[str, float]:
    """One speed per lane and drive (m/s), drawn from the scene id alone (same for every
    frame of a drive): the ego lane, the oncoming lane, and walking pace."""
    rng = np.random.default_rng(zlib.crc32(f"radar|speeds|{frame.scene_id}".encode()))
    return {"ego": float(rng.uniform(3.0, 9.0)), "oncoming": float(rng.uniform(4.0, 11.0)),
            "walk": float(rng.uniform(1.0, 1.6))}


def object_velocities(frame: Frame) -> np.ndarray:
    """``(len(objects), 2)`` ground velocity (vx, vy) of each object, m/s, ego frame."""
    objects = frame.objects or []
    speeds = _lane_speeds(frame)
    lanes = {"ego": L.EGO_LANE_Y, "oncoming": L.ONCOMING_LANE_Y}

    def lane_of(y: float) -> str | None:
        return next((k for k, ly in lanes.items() if abs(y - ly) < 1.2), None)

    flowing = {lane_of(o.center[1]) for o in objects if o.status == "moving"
               and o.category != "pedestrian"} - {None}
    out = np.zeros((len(objects), 2))
    for i, obj in enumerate(objects):
        lane = lane_of(obj.center[1])
        if obj.status == "moving" and obj.category == "pedestrian":
            speed = speeds["walk"]
        elif lane in flowing and (obj.status == "moving" or obj.status == "with rider"):
            speed = speeds[lane]  # type: ignore[index]
        else:
            continue
        out[i] = speed * math.cos(obj.yaw), speed * math.sin(obj.yaw)
    return out


def radar_payload(frame: Frame) -> dict[str, np.ndarray] | None:
    """The five radars' returns of ``frame`` (``None`` without ground truth): radar name ->
    ``float32 (n, 5)`` rows of :data:`RADAR_FIELDS`, ``n <= MAX_RETURNS``, nearest first."""
    if frame.objects is None:
        return None
    rng = _rng(frame, "returns")
    velocities = object_velocities(frame)
    # Candidate returns over all objects (each radar keeps those in its field of view).
    rows: list[tuple[float, float, float, float, float]] = []
    for obj, (vx, vy) in zip(frame.objects, velocities):
        cx, cy, cz = obj.center
        distance = math.hypot(cx, cy)
        if distance > MAX_RANGE or distance < 0.5:
            continue
        width, length = obj.size[0], obj.size[1]
        area = width * length
        detect = 0.97 * (1.0 - 0.6 * (distance / MAX_RANGE) ** 2) * min(1.0, 0.45 + area / 4)
        n = int(rng.binomial(1 + min(int(area // 4), 3), detect))
        cos_y, sin_y = math.cos(obj.yaw), math.sin(obj.yaw)
        for _ in range(n):
            # a scattering point on the object's footprint, then the sensor's noise
            u, v = rng.uniform(-0.5, 0.5) * length, rng.uniform(-0.5, 0.5) * width
            px, py = cx + u * cos_y - v * sin_y, cy + u * sin_y + v * cos_y
            r = math.hypot(px, py) + rng.normal(0.0, 0.25)
            az = math.atan2(py, px) + rng.normal(0.0, math.radians(0.6))
            ux, uy = math.cos(az), math.sin(az)
            v_radial = vx * ux + vy * uy + rng.normal(0.0, 0.15)
            rcs = RCS_DB.get(obj.category, 0.0) + rng.normal(0.0, 2.0)
            rows.append((r * ux, r * uy, cz + rng.normal(0.0, 0.3), v_radial, rcs))
    # Static clutter from the building fronts, and rare ghosts.
    for wall_y in (L.WALL_LEFT_Y, L.WALL_RIGHT_Y):
        for _ in range(int(rng.integers(2, 7))):
            x = float(rng.uniform(-MAX_RANGE * 0.8, MAX_RANGE * 0.8))
            rows.append((x, wall_y + rng.normal(0, 0.3), float(rng.uniform(0.5, 3.0)),
                         rng.normal(0.0, 0.15), float(rng.uniform(5.0, 20.0))))
    for _ in range(int(rng.poisson(0.5))):
        r, az = rng.uniform(5.0, MAX_RANGE), rng.uniform(-math.pi, math.pi)
        rows.append((r * math.cos(az), r * math.sin(az), 0.5, rng.normal(0.0, 3.0),
                     rng.uniform(-10.0, 0.0)))
    points = np.array(rows, dtype=np.float64).reshape(-1, len(RADAR_FIELDS))
    out = {}
    distance = np.hypot(points[:, 0], points[:, 1])
    azimuth = np.arctan2(points[:, 1], points[:, 0])
    for name, yaw_deg in RADARS.items():
        off = np.abs((azimuth - math.radians(yaw_deg) + math.pi) % (2 * math.pi) - math.pi)
        mine = np.flatnonzero((off <= math.radians(HALF_FOV_DEG)) & (distance <= MAX_RANGE))
        mine = mine[np.argsort(distance[mine], kind="stable")][:MAX_RETURNS]
        out[name] = points[mine].astype(np.float32)
    return out


def all_returns(payload: dict[str, np.ndarray]) -> np.ndarray:
    """Every radar's returns stacked ``(n, 5)`` (radars overlap: a point may appear twice)."""
    arrays = [payload[name] for name in RADAR_VIEWS if name in payload]
    return np.concatenate(arrays) if arrays else np.zeros((0, len(RADAR_FIELDS)), np.float32)
