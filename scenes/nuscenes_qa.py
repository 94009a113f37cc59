"""nuScenes-QA loader: questions from ``NuScenes_{train,val}_questions.json`` + nuScenes data.

The nuScenes tables are read directly from ``<dataroot>/<version>/*.json`` with the same
semantics as nuscenes-devkit (``sample['data']`` is built from the key-frame ``sample_data``
records and their sensor channel, paths are ``<dataroot>/<filename>``). The devkit itself is
not required: at the time of writing it pins numpy < 2, which would downgrade this project's
environment.

What a frame holds:
* the six camera images of the sample (``uint8 (H, W, 3)``, optionally resized);
* the ``LIDAR_TOP`` sweep from its ``.pcd.bin`` (5 float32 per point; x, y, z, intensity are
  kept in the sensor frame and intensity is divided by 255 to match the synthetic world);
* light 0.0 if the scene description contains "night" (any case), else 1.0;
* the sample's annotations mapped to the nuScenes-QA classes and statuses, in the ego frame.

Split: the paper's mini split uses the nuScenes-mini scenes only; we split those *scenes*
(day and night scenes separately, so each split has both) instead of the paper's QA-level
50/50, so that no drive is in two splits.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np

from scenes.dataset import SPLITS, FrameInfo, QADataset
from scenes.sample import CAMERA_VIEWS, LIDAR, Frame, ObjectAnnotation, QAItem
from scenes.storage import DatasetFormatError, qa_from_json

log = logging.getLogger(__name__)

#: The ten scenes of nuScenes-mini (v1.0-mini).
MINI_SCENES: tuple[str, ...] = (
    "scene-0061", "scene-0103", "scene-0553", "scene-0655", "scene-0757", "scene-0796",
    "scene-0916", "scene-1077", "scene-1094", "scene-1100",
)
QUESTION_FILES = ("NuScenes_train_questions.json", "NuScenes_val_questions.json")
REQUIRED_TABLES = ("scene", "sample", "sample_data", "calibrated_sensor", "sensor", "ego_pose")
ANNOTATION_TABLES = ("sample_annotation", "instance", "category", "attribute")

#: nuScenes category prefix -> nuScenes-QA class (first match wins).
CATEGORY_MAP: tuple[tuple[str, str], ...] = (
    ("vehicle.car", "car"), ("vehicle.truck", "truck"), ("vehicle.bus", "bus"),
    ("vehicle.trailer", "trailer"), ("vehicle.construction", "construction vehicle"),
    ("vehicle.motorcycle", "motorcycle"), ("vehicle.bicycle", "bicycle"),
    ("human.pedestrian", "pedestrian"), ("movable_object.trafficcone", "traffic cone"),
    ("movable_object.barrier", "barrier"),
)
ATTRIBUTE_MAP = {
    "vehicle.moving": "moving", "vehicle.parked": "parked", "vehicle.stopped": "stopped",
    "pedestrian.moving": "moving", "pedestrian.standing": "standing",
    "pedestrian.sitting_lying_down": "not standing", "cycle.with_rider": "with rider",
    "cycle.without_rider": "without rider",
}


class NuScenesTables:
    """The nuScenes JSON tables of one version, indexed by token."""

    def __init__(self, dataroot: str | Path, version: str = "v1.0-mini"):
        self.dataroot = Path(dataroot)
        self.table_dir = self.dataroot / version
        if not self.table_dir.is_dir():
            raise FileNotFoundError(f"nuScenes tables {self.table_dir} not found (expected "
                                    f"<dataroot>/{version}/scene.json, ...)")
        self.tables: dict[str, dict[str, dict]] = {}
        for name in REQUIRED_TABLES:
            self.tables[name] = self._load(name, required=True)
        for name in ANNOTATION_TABLES:
            self.tables[name] = self._load(name, required=False)
        self.channel_of = {
            cs["token"]: self.get("sensor", cs["sensor_token"])["channel"]
            for cs in self.tables["calibrated_sensor"].values()
        }
        self.sample_data_of: dict[str, dict[str, str]] = {}
        for sd in self.tables["sample_data"].values():
            if sd.get("is_key_frame", True):
                channel = self.channel_of.get(sd["calibrated_sensor_token"])
                if channel is None:
                    raise DatasetFormatError(f"{self.table_dir / 'sample_data.json'}: record "
                                             f"{sd['token']} names an unknown calibrated_sensor")
                self.sample_data_of.setdefault(sd["sample_token"], {})[channel] = sd["token"]
        self.annotations_of: dict[str, list[dict]] = {}
        for ann in self.tables["sample_annotation"].values():
            self.annotations_of.setdefault(ann["sample_token"], []).append(ann)

    def _load(self, name: str, required: bool) -> dict[str, dict]:
        path = self.table_dir / f"{name}.json"
        if not path.is_file():
            if required:
                raise FileNotFoundError(f"nuScenes table {path} is missing")
            return {}
        try:
            rows = json.loads(path.read_text())
            return {row["token"]: row for row in rows}
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DatasetFormatError(f"nuScenes table {path} is malformed ({exc!r})") from exc

    def get(self, table: str, token: str) -> dict:
        """Like ``NuScenes.get``: the record or a KeyError naming table and token."""
        try:
            return self.tables[table][token]
        except KeyError:
            raise KeyError(f"nuScenes table {self.table_dir / (table + '.json')} has no "
                           f"token {token!r}") from None

    def sample_data(self, sample_token: str) -> dict[str, str]:
        """``nusc.get('sample', token)['data']``: channel -> sample_data token."""
        self.get("sample", sample_token)
        return self.sample_data_of.get(sample_token, {})

    def sample_data_path(self, sd_token: str) -> Path:
        return self.dataroot / self.get("sample_data", sd_token)["filename"]

    def scene_of(self, sample_token: str) -> dict:
        return self.get("scene", self.get("sample", sample_token)["scene_token"])


def _quaternion_to_yaw(q) -> float:
    w, x, y, z = q
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def _quaternion_matrix(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _class_of(category: str) -> str | None:
    for prefix, name in CATEGORY_MAP:
        if category.startswith(prefix):
            return name
    return None


def read_lidar_bin(path: Path) -> np.ndarray:
    """A nuScenes ``.pcd.bin`` sweep as float32 ``(N, 4)``: x, y, z, intensity / 255."""
    if not path.is_file():
        raise FileNotFoundError(f"LiDAR file {path} is missing")
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % 5:
        raise DatasetFormatError(f"LiDAR file {path}: size is not a multiple of 5 float32")
    points = raw.reshape(-1, 5)[:, :4].copy()
    points[:, 3] /= 255.0
    if not np.isfinite(points).all():
        raise DatasetFormatError(f"LiDAR file {path} holds NaN or inf")
    return points


def read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """An RGB image as uint8 ``(H, W, 3)``, resized to ``size = (H, W)`` if given."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"camera image {path} is missing")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None:
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetFormatError(f"camera image {path} cannot be read ({exc})") from exc


def load_frame_from_tables(tables: NuScenesTables, sample_token: str,
                           image_size: tuple[int, int] | None = None) -> Frame:
    """One nuScenes sample as a :class:`Frame` (six views, LIDAR_TOP, light, objects)."""
    data = tables.sample_data(sample_token)
    missing = [c for c in (*CAMERA_VIEWS, LIDAR) if c not in data]
    if missing:
        raise DatasetFormatError(f"nuScenes sample {sample_token} has no key-frame sample_data "
                                 f"for {missing}")
    cameras = {v: read_image(tables.sample_data_path(data[v]), image_size) for v in CAMERA_VIEWS}
    lidar_sd = tables.get("sample_data", data[LIDAR])
    points = read_lidar_bin(tables.dataroot / lidar_sd["filename"])
    scene = tables.scene_of(sample_token)
    sample = tables.get("sample", sample_token)
    # The radars' own files are not read yet; their returns are not derived from the boxes
    # either (real data has no synthetic radar), so nuScenes frames carry camera + LiDAR.
    return Frame.from_rig(sample_token, scene["name"], float(sample["timestamp"]) / 1e6,
                          light_of_scene(scene), cameras, points,
                          _objects_in_ego(tables, sample_token, lidar_sd))


def _objects_in_ego(tables: NuScenesTables, sample_token: str,
                    lidar_sd: dict) -> list[ObjectAnnotation] | None:
    anns = tables.annotations_of.get(sample_token)
    if anns is None:
        return None if not tables.tables["sample_annotation"] else []
    pose = tables.get("ego_pose", lidar_sd["ego_pose_token"])
    rot = _quaternion_matrix(pose["rotation"])
    ego_yaw = _quaternion_to_yaw(pose["rotation"])
    out = []
    for ann in anns:
        instance = tables.get("instance", ann["instance_token"])
        name = _class_of(tables.get("category", instance["category_token"])["name"])
        if name is None:
            continue
        status = None
        for token in ann.get("attribute_tokens", []):
            status = ATTRIBUTE_MAP.get(tables.get("attribute", token)["name"], status)
        centre = rot.T @ (np.asarray(ann["translation"], dtype=np.float64)
                          - np.asarray(pose["translation"], dtype=np.float64))
        out.append(ObjectAnnotation(
            category=name, center=tuple(float(c) for c in centre),
            size=tuple(float(s) for s in ann["size"]),
            yaw=float(np.angle(np.exp(1j * (_quaternion_to_yaw(ann["rotation"]) - ego_yaw)))),
            status=status))
    return out


def light_of_scene(scene: dict) -> float:
    return 0.0 if "night" in scene.get("description", "").lower() else 1.0


def read_questions(path: Path) -> list[QAItem]:
    if not path.is_file():
        raise FileNotFoundError(f"nuScenes-QA questions file {path} is missing")
    try:
        payload = json.loads(path.read_text())
        rows = payload["questions"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetFormatError(f"nuScenes-QA questions file {path} is malformed: expected "
                                 f'{{"questions": [...]}} ({exc!r})') from exc
    return [qa_from_json(row, str(path)) for row in rows]


def split_scenes(scenes: list[dict], fractions: tuple[float, float, float],
                 seed: int) -> dict[str, str]:
    """Scene name -> split; day and night scenes are split separately."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three shares >= 0 that sum to 1, got {fractions}")
    out: dict[str, str] = {}
    for night in (False, True):
        names = sorted(s["name"] for s in scenes if (light_of_scene(s) == 0.0) == night)
        names.sort(key=lambda n: zlib.crc32(f"{seed}:{n}".encode()))
        bounds = np.round(np.cumsum(fractions) * len(names)).astype(int)
        for i, name in enumerate(names):
            out[name] = SPLITS[int(np.searchsorted(bounds, i, side="right"))]
    return out


def load_nuscenes_qa(
    dataroot: str | Path,
    split: str,
    questions_dir: str | Path | None = None,
    version: str = "v1.0-mini",
    mini_only: bool = True,
    fractions: tuple[float, float, float] = (0.5, 0.0, 0.5),
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> QADataset:
    """nuScenes-QA questions of ``split`` with frames loaded lazily from ``dataroot``.

    Args:
        dataroot: the nuScenes root (holds ``<version>/`` tables, ``samples/``, ``sweeps/``).
        split: train / val / test, by scene (see :func:`split_scenes`).
        questions_dir: folder with ``NuScenes_{train,val}_questions.json`` (default:
            ``dataroot``, then ``dataroot/questions``); both files are read if present.
        version: nuScenes table version folder.
        mini_only: keep only the nuScenes-mini scenes (the paper's mini split).
        fractions: (train, val, test) shares of scenes; the paper's 50/50 is the default.
        image_size: (H, W) to resize camera images to; ``None`` keeps them as stored.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dataroot = Path(dataroot)
    tables = NuScenesTables(dataroot, version)
    candidates = [Path(questions_dir)] if questions_dir else [dataroot, dataroot / "questions"]
    qdir = next((d for d in candidates if any((d / f).is_file() for f in QUESTION_FILES)), None)
    if qdir is None:
        raise FileNotFoundError(f"no nuScenes-QA question file ({' or '.join(QUESTION_FILES)}) "
                                f"in {' or '.join(str(d) for d in candidates)}")
    items = [q for f in QUESTION_FILES if (qdir / f).is_file() for q in read_questions(qdir / f)]
    scenes = [s for s in tables.tables["scene"].values()
              if not mini_only or s["name"] in MINI_SCENES]
    split_of = split_scenes(scenes, fractions, seed)
    frames: dict[str, FrameInfo] = {}
    kept: list[QAItem] = []
    unknown = 0
    for q in items:
        if q.frame_id not in tables.tables["sample"]:
            unknown += 1
            continue
        scene = tables.scene_of(q.frame_id)
        if split_of.get(scene["name"]) != split:
            continue
        frames.setdefault(q.frame_id, FrameInfo(scene["name"], light_of_scene(scene)))
        kept.append(q)
    if items and unknown == len(items):
        raise DatasetFormatError(f"none of the {len(items)} questions in {qdir} refer to a "
                                 f"sample in {tables.table_dir} (wrong --version?)")
    if unknown:
        log.info("%d questions refer to samples not in %s (other nuScenes version)", unknown,
                 tables.table_dir)
    return QADataset(kept, frames, lambda token: load_frame_from_tables(tables, token,
                                                                         image_size),
                     name=f"nuscenes-qa:{dataroot}:{split}")
