"""The synthetic world's content: object classes, the road, and one scene's layout.

World coordinates: the road runs along ``+X``; ``y`` points left, ``z`` up, the road surface
is ``z = 0``. The ego drives along ``y = 0`` (its lane). Cross-section, right to left::

    wall | sidewalk | parking strip | ego lane | oncoming lane | parking strip | sidewalk | wall

Where an object stands tells its status in both sensors (a vehicle in a parking strip is
parked, in a lane it is moving or stopped; a bicycle on the sidewalk has no rider), but some
cues exist only for the camera: brake lights separate *stopped* from *moving*, and paint
separates class pairs that share one shape (truck / construction vehicle, bus / trailer,
bicycle / motorcycle, barrier / traffic cone).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scenes.sample import ObjectAnnotation

# Cross-section of the road (metres, y coordinate).
LANE_WIDTH = 3.5
EGO_LANE_Y = 0.0
ONCOMING_LANE_Y = 3.5
PARKING_RIGHT_Y = -3.0
PARKING_LEFT_Y = 6.5
ROAD_RIGHT_EDGE = -4.25
ROAD_LEFT_EDGE = 7.75
SIDEWALK_WIDTH = 4.0
WALL_RIGHT_Y = ROAD_RIGHT_EDGE - SIDEWALK_WIDTH
WALL_LEFT_Y = ROAD_LEFT_EDGE + SIDEWALK_WIDTH
KERB_HEIGHT = 0.15
#: Paint: dashed centre line, solid lines between lanes and parking strips.
CENTRE_LINE_Y = 1.75
EDGE_LINES_Y = (-1.75, 5.25)
BLOCK_LENGTH = 12.0  # buildings come in blocks of this length along X

#: Seconds between two frames of a scene (nuScenes key frames are at 2 Hz).
FRAME_INTERVAL_S = 0.5

VEHICLE_STATUSES = ("moving", "stopped", "parked")
PEDESTRIAN_STATUSES = ("moving", "standing", "not standing")
CYCLE_STATUSES = ("with rider", "without rider")


@dataclass(frozen=True)
class ClassSpec:
    """Geometry, statuses and materials of one nuScenes class in the synthetic world."""

    name: str
    width: tuple[float, float]
    length: tuple[float, float]
    height: tuple[float, float]
    statuses: tuple[str, ...]
    reflectivity: float  # LiDAR intensity of the body
    palette: tuple[tuple[float, float, float], ...]  # body colours the camera sees


CLASSES: dict[str, ClassSpec] = {
    spec.name: spec
    for spec in (
        ClassSpec("car", (1.8, 2.0), (4.2, 4.9), (1.45, 1.7), VEHICLE_STATUSES, 0.30,
                  ((0.7, 0.1, 0.1), (0.15, 0.25, 0.6), (0.75, 0.75, 0.78), (0.9, 0.9, 0.9),
                   (0.1, 0.1, 0.12), (0.2, 0.45, 0.3))),
        # Truck and construction vehicle share one shape; the camera tells them apart.
        ClassSpec("truck", (2.4, 2.7), (6.0, 7.5), (2.8, 3.3), VEHICLE_STATUSES, 0.35,
                  ((0.92, 0.92, 0.92), (0.2, 0.3, 0.65), (0.55, 0.55, 0.58), (0.6, 0.15, 0.1))),
        ClassSpec("construction vehicle", (2.4, 2.7), (6.0, 7.5), (2.8, 3.3), VEHICLE_STATUSES,
                  0.35, ((0.95, 0.75, 0.05), (0.95, 0.55, 0.05))),
        # Bus and trailer share one shape too.
        ClassSpec("bus", (2.6, 2.9), (10.5, 12.0), (3.1, 3.5), VEHICLE_STATUSES, 0.35,
                  ((0.75, 0.1, 0.1), (0.1, 0.35, 0.7), (0.9, 0.9, 0.85))),
        ClassSpec("trailer", (2.6, 2.9), (10.5, 12.0), (3.1, 3.5), VEHICLE_STATUSES, 0.35,
                  ((0.5, 0.42, 0.35), (0.45, 0.47, 0.5), (0.35, 0.3, 0.25))),
        ClassSpec("pedestrian", (0.55, 0.75), (0.45, 0.65), (1.6, 1.9), PEDESTRIAN_STATUSES,
                  0.12, ((0.8, 0.2, 0.2), (0.2, 0.5, 0.8), (0.9, 0.8, 0.2), (0.3, 0.7, 0.3),
                         (0.95, 0.95, 0.95), (0.6, 0.3, 0.6))),
        # Bicycle and motorcycle: same size; the camera sees the engine, paint and lights.
        ClassSpec("bicycle", (0.6, 0.8), (1.7, 2.0), (1.0, 1.2), CYCLE_STATUSES, 0.25,
                  ((0.2, 0.7, 0.3), (0.85, 0.85, 0.2), (0.3, 0.6, 0.9))),
        ClassSpec("motorcycle", (0.6, 0.8), (1.7, 2.0), (1.0, 1.2), CYCLE_STATUSES, 0.25,
                  ((0.1, 0.1, 0.1), (0.55, 0.05, 0.05), (0.3, 0.3, 0.35))),
        # Barrier and traffic cone: both retro-reflective posts of the same size.
        ClassSpec("traffic cone", (0.4, 0.6), (0.4, 0.6), (0.75, 1.0), (), 0.5,
                  ((1.0, 0.45, 0.05),)),
        ClassSpec("barrier", (0.4, 0.6), (0.4, 0.6), (0.75, 1.0), (), 0.5,
                  ((0.85, 0.1, 0.1),)),
    )
}
CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}
RIDER_HEIGHT_GAIN = 0.65  # a rider makes a cycle this much taller
SITTING_HEIGHT = (0.9, 1.15)  # pedestrians that are not standing


@dataclass
class WorldObject:
    """One object of a scene in world coordinates at time 0."""

    category: str
    status: str | None
    center: np.ndarray  # (3,) x, y, z of the box centre
    size: np.ndarray  # (3,) width, length, height
    yaw: float
    speed: float  # m/s along the heading
    colour: np.ndarray  # (3,) body albedo
    lights_on: bool  # head/tail lights lit (vehicles in traffic, ridden motorcycles)

    def center_at(self, t: float) -> np.ndarray:
        step = self.speed * t * np.array([np.cos(self.yaw), np.sin(self.yaw), 0.0])
        return self.center + step


@dataclass
class SceneLayout:
    """Everything static or scripted about one scene (a short drive)."""

    scene_id: str
    objects: list[WorldObject]
    ego_speed: float
    wall_heights_right: np.ndarray  # per building block, 0 = gap
    wall_heights_left: np.ndarray
    wall_colours: np.ndarray  # (2, blocks, 3)
    lit_window_seed: int
    block_offset: int  # block index of the first entry of the wall arrays

    def ego_x(self, t: float) -> float:
        return self.ego_speed * t

    def annotations_at(self, t: float) -> list[ObjectAnnotation]:
        """Objects at time ``t`` in ego coordinates (the ego sits at ``(ego_x(t), 0, 0)``)."""
        ego = np.array([self.ego_x(t), 0.0, 0.0])
        out = []
        for obj in self.objects:
            c = obj.center_at(t) - ego
            w, length, h = obj.size
            out.append(ObjectAnnotation(
                category=obj.category, center=(float(c[0]), float(c[1]), float(c[2])),
                size=(float(w), float(length), float(h)), yaw=float(obj.yaw),
                status=obj.status,
            ))
        return out


def _class_weights(rng: np.random.Generator, names: tuple[str, ...]) -> np.ndarray:
    """Scene-specific class mix: a few classes dominate, so counts vary widely by scene."""
    weights = rng.gamma(0.5, size=len(names)) + 1e-3
    return weights / weights.sum()


def _make_object(rng: np.random.Generator, category: str, status: str | None, x: float,
                 y: float, yaw: float, speed: float) -> WorldObject:
    spec = CLASSES[category]
    w, length, h = (rng.uniform(*spec.width), rng.uniform(*spec.length),
                    rng.uniform(*spec.height))
    if status == "with rider":
        h += RIDER_HEIGHT_GAIN
    elif status == "not standing":
        h = rng.uniform(*SITTING_HEIGHT)
        length = max(length, 0.8)  # sitting or lying takes more room
    elif category == "pedestrian" and status == "moving":
        length = rng.uniform(0.75, 0.95)  # the stride
    colour = np.array(spec.palette[rng.integers(len(spec.palette))], dtype=np.float64)
    colour = np.clip(colour * rng.uniform(0.85, 1.1), 0.0, 1.0)
    lights = category in ("car", "truck", "bus", "construction vehicle", "trailer") and \
        status in ("moving", "stopped") or (category == "motorcycle" and status == "with rider")
    z = h / 2 + (KERB_HEIGHT if abs(y - 1.75) > 6.0 else 0.0)
    return WorldObject(category, status, np.array([x, y, z]), np.array([w, length, h]), yaw,
                       speed, colour, bool(lights))


def _fill_line(rng, x_start, x_end, gap, pick):
    """Place items one after another along X; ``pick()`` returns (category, status) or None."""
    placed = []
    x = x_start + rng.uniform(0, gap[1])
    while x < x_end:
        choice = pick()
        if choice is None:
            x += rng.uniform(*gap)
            continue
        placed.append((x, *choice))
        x += rng.uniform(*gap) + 2 * CLASSES[choice[0]].length[1] / 2 + 0.5
    return placed


def sample_scene_layout(rng: np.random.Generator, scene_id: str, duration_s: float,
                        density: float = 1.0) -> SceneLayout:
    """Draw one scene: traffic in two lanes, parked vehicles, sidewalks, buildings.

    Args:
        rng: the scene's own generator (the caller seeds it from the world seed + scene id).
        scene_id: stored in the layout.
        duration_s: how long the ego drives; the populated stretch covers it.
        density: scales how crowded the scene is (1.0 ~ 10-25 objects around the ego).
    """
    ego_speed = 0.0 if rng.random() < 0.3 else float(rng.uniform(3.0, 9.0))
    x_lo, x_hi = -45.0, 45.0 + ego_speed * duration_s
    weights = _class_weights(rng, CLASS_NAMES)
    w = dict(zip(CLASS_NAMES, weights))

    def pick_from(cands: dict[str, tuple[str, ...]], empty: float):
        names = list(cands)
        p = np.array([w[n] for n in names]) + 0.02
        p = p / p.sum()

        def pick():
            if rng.random() < empty:
                return None
            name = names[rng.choice(len(names), p=p)]
            options = cands[name]
            return name, (options[rng.integers(len(options))] if options else None)
        return pick

    gap = (2.0, 12.0 / density)
    objects: list[WorldObject] = []
    vehicles = ("car", "truck", "bus", "trailer", "construction vehicle")
    # Ego lane: traffic moves with the ego; stopped when the ego waits.
    ego_status = "stopped" if ego_speed == 0.0 else "moving"
    lane_cands = {v: (ego_status,) for v in vehicles}
    lane_cands.update({"motorcycle": ("with rider",), "bicycle": ("with rider",)})
    for x, cat, status in _fill_line(rng, x_lo, x_hi, (6.0, 25.0 / density),
                                     pick_from(lane_cands, 0.1)):
        if abs(x) < 9.0:
            continue  # the ego's own spot
        objects.append(_make_object(rng, cat, status, x, EGO_LANE_Y, 0.0, ego_speed))
    # Oncoming lane: either flowing or queued.
    oncoming_speed = 0.0 if rng.random() < 0.35 else float(rng.uniform(4.0, 11.0))
    on_status = "stopped" if oncoming_speed == 0.0 else "moving"
    lane_cands = {v: (on_status,) for v in vehicles}
    lane_cands.update({"motorcycle": ("with rider",), "bicycle": ("with rider",)})
    span = oncoming_speed * duration_s
    for x, cat, status in _fill_line(rng, x_lo, x_hi + span, (5.0, 25.0 / density),
                                     pick_from(lane_cands, 0.1)):
        objects.append(_make_object(rng, cat, status, x, ONCOMING_LANE_Y, np.pi,
                                    oncoming_speed))
    # Parking strips: parked vehicles and work zones of cones / barriers.
    strip_cands = {v: ("parked",) for v in vehicles}
    strip_cands.update({"traffic cone": (), "barrier": ()})
    for strip_y in (PARKING_RIGHT_Y, PARKING_LEFT_Y):
        for x, cat, status in _fill_line(rng, x_lo, x_hi, gap, pick_from(strip_cands, 0.35)):
            yaw = (0.0 if rng.random() < 0.7 else np.pi) + rng.normal(0, 0.05)
            y = strip_y + (rng.uniform(-0.6, 0.6) if cat in ("traffic cone", "barrier") else 0)
            objects.append(_make_object(rng, cat, status, x, y, yaw, 0.0))
    # Sidewalks: a kerb-side band (people waiting, parked cycles, posts) and a walking band.
    kerb_cands = {"pedestrian": ("standing", "not standing"), "bicycle": ("without rider",),
                  "motorcycle": ("without rider",), "traffic cone": (), "barrier": ()}
    for edge, side in ((ROAD_RIGHT_EDGE, -1.0), (ROAD_LEFT_EDGE, 1.0)):
        for x, cat, status in _fill_line(rng, x_lo, x_hi, (1.5, 9.0 / density),
                                         pick_from(kerb_cands, 0.4)):
            yaw = float(rng.uniform(-np.pi, np.pi)) if cat == "pedestrian" else \
                (np.pi / 2 if cat in ("bicycle", "motorcycle") else 0.0)
            objects.append(_make_object(rng, cat, status, x, edge + side * 1.0, yaw, 0.0))
        walk_dir = 0.0 if rng.random() < 0.5 else np.pi
        walk_speed = float(rng.uniform(1.0, 1.6))
        for x, cat, status in _fill_line(rng, x_lo - 10, x_hi + 10, (2.0, 14.0 / density),
                                         pick_from({"pedestrian": ("moving",)}, 0.3)):
            objects.append(_make_object(rng, cat, status, x, edge + side * 2.8, walk_dir,
                                        walk_speed))
    blocks = int(np.ceil((x_hi - x_lo + 200) / BLOCK_LENGTH))
    heights = rng.uniform(4.0, 16.0, size=(2, blocks)) * (rng.random((2, blocks)) > 0.2)
    colours = rng.uniform(0.35, 0.75, size=(2, blocks, 3)) * np.array([1.0, 0.9, 0.8])
    return SceneLayout(
        scene_id=scene_id, objects=objects, ego_speed=ego_speed,
        wall_heights_right=heights[0], wall_heights_left=heights[1], wall_colours=colours,
        lit_window_seed=int(rng.integers(2**31)),
        block_offset=int(np.floor((x_lo - 100) / BLOCK_LENGTH)),
    )
