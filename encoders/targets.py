"""Supervised targets derived from a frame's ground-truth objects (for pretraining and probes).

The scene is summarised per *region* — per camera view for the camera encoder, per azimuth
band for the LiDAR encoder — as counts: objects of each class, objects in each distance
ring (any class), and objects of each status (moving, stopped, parked, standing, ...: what
the status questions ask and what separates a parked car from a stopped one). Counts are
clipped to ``max_count`` and used as classes ``0..max_count``.
Regions follow object centres (an object can be in two overlapping camera views).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from scenes.camera import RIG
from scenes.layout import (
    CLASS_NAMES,
    CLASSES,
    CYCLE_STATUSES,
    PEDESTRIAN_STATUSES,
    VEHICLE_STATUSES,
)
from scenes.questions import RELATIONS, sector_index
from scenes.sample import CAMERA_VIEWS, Frame

#: Distance rings (metres, upper bounds) of the class-agnostic occupancy targets.
DISTANCE_RINGS: tuple[float, ...] = (10.0, 20.0, 40.0)
#: Every object status of the world (cones and barriers have none).
STATUS_NAMES: tuple[str, ...] = tuple(dict.fromkeys(
    VEHICLE_STATUSES + PEDESTRIAN_STATUSES + CYCLE_STATUSES))
RING_NAMES: tuple[str, ...] = tuple(
    f"objects within {lo:g}-{hi:g} m" for lo, hi in zip((0.0,) + DISTANCE_RINGS, DISTANCE_RINGS))
#: Names of the count targets of one region, in order: classes, distance rings, statuses.
TARGET_NAMES: tuple[str, ...] = CLASS_NAMES + RING_NAMES + tuple(
    f"status {s}" for s in STATUS_NAMES)
#: Where each group of targets sits in :data:`TARGET_NAMES`.
CLASS_SLICE = slice(0, len(CLASS_NAMES))
RING_SLICE = slice(CLASS_SLICE.stop, CLASS_SLICE.stop + len(RING_NAMES))
STATUS_SLICE = slice(RING_SLICE.stop, RING_SLICE.stop + len(STATUS_NAMES))


def _shape_groups() -> tuple[tuple[str, ...], ...]:
    """Classes grouped by identical size ranges in the world (truck and construction vehicle,
    bus and trailer, ...): what geometry alone (LiDAR) can tell apart."""
    groups: dict[tuple, list[str]] = {}
    for name, spec in CLASSES.items():
        groups.setdefault((spec.width, spec.length, spec.height), []).append(name)
    return tuple(tuple(g) for g in groups.values())


#: Classes that share one shape, in class order (e.g. ``("truck", "construction vehicle")``).
SHAPE_GROUPS: tuple[tuple[str, ...], ...] = _shape_groups()


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def view_membership(azimuth: float) -> list[int]:
    """Indices (in :data:`CAMERA_VIEWS` order) of the views whose field of view holds
    ``azimuth`` (radians, 0 = ahead, positive to the left)."""
    out = []
    for index, view in enumerate(CAMERA_VIEWS):
        yaw_deg, hfov_deg = RIG[view]
        if abs(_wrap(azimuth - math.radians(yaw_deg))) <= math.radians(hfov_deg) / 2:
            out.append(index)
    return out


def band_of(azimuth: float, bands: int) -> int:
    """The azimuth band of the LiDAR encoder that holds ``azimuth``: band 0 starts behind the
    vehicle and bands advance counter-clockwise, as range-image columns do."""
    fraction = 0.5 * (1.0 - _wrap(azimuth) / math.pi)
    return min(int(fraction * bands), bands - 1)


def _object_rows(frame: Frame, max_distance: float | None = None
                 ) -> list[tuple[int, int, float, int]]:
    """(class index or -1, ring index or -1, azimuth, status index or -1) of every annotated
    object (only those within ``max_distance`` metres when given)."""
    if frame.objects is None:
        raise ValueError(f"frame {frame.frame_id} has no ground-truth objects; pretraining and "
                         "probes need annotated frames (the synthetic world has them)")
    rows = []
    for obj in frame.objects:
        x, y = obj.center[0], obj.center[1]
        distance = math.hypot(x, y)
        if max_distance is not None and distance > max_distance:
            continue
        ring = next((i for i, hi in enumerate(DISTANCE_RINGS) if distance <= hi), -1)
        cls = CLASS_NAMES.index(obj.category) if obj.category in CLASS_NAMES else -1
        status = STATUS_NAMES.index(obj.status) if obj.status in STATUS_NAMES else -1
        rows.append((cls, ring, math.atan2(y, x), status))
    return rows


def region_counts(frames: Sequence[Frame], regions: str, bands: int = 8,
                  max_count: int = 3, max_distance: float | None = None) -> np.ndarray:
    """Clipped counts ``(B, R, len(TARGET_NAMES))`` int64 per view (``regions="views"``,
    R = 6) or per azimuth band (``regions="bands"``, R = ``bands``), of the objects within
    ``max_distance`` metres (all annotated ones by default)."""
    if regions not in ("views", "bands"):
        raise ValueError(f"regions must be 'views' or 'bands', got {regions!r}")
    n_regions = len(CAMERA_VIEWS) if regions == "views" else bands
    out = np.zeros((len(frames), n_regions, len(TARGET_NAMES)), dtype=np.int64)
    for b, frame in enumerate(frames):
        for cls, ring, azimuth, status in _object_rows(frame, max_distance):
            where = view_membership(azimuth) if regions == "views" else [band_of(azimuth, bands)]
            for r in where:
                if cls >= 0:
                    out[b, r, CLASS_SLICE.start + cls] += 1
                if ring >= 0:
                    out[b, r, RING_SLICE.start + ring] += 1
                if status >= 0:
                    out[b, r, STATUS_SLICE.start + status] += 1
    return np.minimum(out, max_count)


def frame_class_counts(frames: Sequence[Frame], max_count: int = 3) -> np.ndarray:
    """Clipped per-class counts over the whole frame ``(B, len(CLASS_NAMES))`` int64."""
    out = np.zeros((len(frames), len(CLASS_NAMES)), dtype=np.int64)
    for b, frame in enumerate(frames):
        for cls, _, _, _ in _object_rows(frame):
            if cls >= 0:
                out[b, cls] += 1
    return np.minimum(out, max_count)


def frame_group_counts(frames: Sequence[Frame], max_count: int = 3) -> np.ndarray:
    """Clipped object counts per :data:`SHAPE_GROUPS` entry ``(B, len(SHAPE_GROUPS))``."""
    per_class = frame_class_counts(frames, max_count=10**6)
    out = np.stack([per_class[:, [CLASS_NAMES.index(n) for n in group]].sum(1)
                    for group in SHAPE_GROUPS], axis=1)
    return np.minimum(out, max_count)


# ------------------------------------------------------------------ token descriptions


def object_phrase(obj) -> str:
    """An object as the questions name it: status, class and direction ("parked car front
    left"; cones and barriers have no status)."""
    sector = int(sector_index(np.float64(obj.center[0]), np.float64(obj.center[1])))
    status = obj.status if obj.status in STATUS_NAMES else ""
    return " ".join(w for w in (status, obj.category, RELATIONS[sector]) if w)


def nearest_objects(frame: Frame, max_objects: int | None = None,
                    max_distance: float | None = None) -> list:
    """``frame``'s annotated objects, nearest first (within ``max_distance`` metres, at most
    ``max_objects``)."""
    if frame.objects is None:
        raise ValueError(f"frame {frame.frame_id} has no ground-truth objects; anchoring and "
                         "probes need annotated frames (the synthetic world has them)")
    objects = sorted(frame.objects, key=lambda o: math.hypot(o.center[0], o.center[1]))
    if max_distance is not None:
        objects = [o for o in objects if math.hypot(o.center[0], o.center[1]) <= max_distance]
    return objects if max_objects is None else objects[:max_objects]


def region_descriptions(frame: Frame, regions: str, n_regions: int, max_objects: int = 4,
                        max_distance: float | None = 40.0) -> list[str]:
    """Per region (camera view or azimuth band, as :func:`region_counts`), its nearest
    objects in words ("parked car front left and moving pedestrian front"; "nothing"): what
    a region's tokens should say (text-anchored aligner pretraining, ``aligners/anchoring.py``)."""
    return [" and ".join(object_phrase(o) for o in objects[:max_objects]) or "nothing"
            for objects in region_objects(frame, regions, n_regions, max_distance)]


# ------------------------------------------------------------------ object-slot targets

#: What each object slot predicts about its object, and how many values each field has.
#: ``class``: the class, or "nothing" (the last value) for an empty slot; ``status``: the
#: status, or "none" (the last value) for classes without one (cones, barriers); ``ring``:
#: the distance ring (:data:`DISTANCE_RINGS`); ``sector``: the direction from the ego
#: vehicle as the questions name it (``scenes.questions.RELATIONS``). Fields other than
#: ``class`` are :data:`IGNORE` for an empty slot.
OBJECT_FIELDS: dict[str, int] = {"class": len(CLASS_NAMES) + 1,
                                 "status": len(STATUS_NAMES) + 1,
                                 "ring": len(DISTANCE_RINGS), "sector": len(RELATIONS)}
#: The target of a field a slot has nothing to say about (``cross_entropy(ignore_index=...)``).
IGNORE = -100


def region_objects(frame: Frame, regions: str, n_regions: int,
                   max_distance: float | None = 40.0) -> list[list]:
    """Per region (camera view or azimuth band, as :func:`region_counts`), its annotated
    objects nearest first: the objects the region's slots stand for, in slot order."""
    if regions not in ("views", "bands"):
        raise ValueError(f"regions must be 'views' or 'bands', got {regions!r}")
    found: list[list] = [[] for _ in range(n_regions)]
    for obj in nearest_objects(frame, max_distance=max_distance):
        azimuth = math.atan2(obj.center[1], obj.center[0])
        where = view_membership(azimuth) if regions == "views" else [band_of(azimuth, n_regions)]
        for r in where:
            found[r].append(obj)
    return found


def object_fields(obj) -> tuple[int, int, int, int]:
    """An annotated object's :data:`OBJECT_FIELDS` values: class, status ("none" for classes
    without one), distance ring (the last one beyond it) and direction sector."""
    x, y = float(obj.center[0]), float(obj.center[1])
    distance = math.hypot(x, y)
    status = STATUS_NAMES.index(obj.status) if obj.status in STATUS_NAMES else len(STATUS_NAMES)
    ring = next((i for i, hi in enumerate(DISTANCE_RINGS) if distance <= hi),
                len(DISTANCE_RINGS) - 1)
    return (CLASS_NAMES.index(obj.category), status, ring,
            int(sector_index(np.float64(x), np.float64(y))))


def slot_targets(frames: Sequence[Frame], regions: str, n_regions: int, slots: int,
                 max_distance: float | None = 40.0) -> np.ndarray:
    """Object-slot targets ``(B, R, slots, len(OBJECT_FIELDS))`` int64: slot k of region r
    stands for the region's k-th nearest object (:func:`region_objects`), described by
    :data:`OBJECT_FIELDS`; slots beyond the region's objects say "nothing"."""
    out = np.full((len(frames), n_regions, slots, len(OBJECT_FIELDS)), IGNORE, dtype=np.int64)
    out[..., 0] = len(CLASS_NAMES)  # "nothing"
    for b, frame in enumerate(frames):
        for r, objects in enumerate(region_objects(frame, regions, n_regions, max_distance)):
            for k, obj in enumerate(objects[:slots]):
                out[b, r, k] = object_fields(obj)
    return out


def slot_descriptions(frame: Frame, regions: str, n_regions: int, slots: int,
                      max_distance: float | None = 40.0) -> list[str]:
    """What each object slot should say, region-major: its object in words
    (:func:`object_phrase`) or "nothing", in the order of :func:`slot_targets`."""
    out = []
    for objects in region_objects(frame, regions, n_regions, max_distance):
        phrases = [object_phrase(o) for o in objects[:slots]]
        out.extend(phrases + ["nothing"] * (slots - len(phrases)))
    return out
