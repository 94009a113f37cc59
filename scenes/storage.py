"""On-disk format of a generated world (see scenes/README.md) and its reader.

Layout::

    DIR/manifest.json               format, version, world config, splits, sha256 of every file
    DIR/<split>/questions.json      {"info": ..., "frames": [...], "questions": [...]}
    DIR/<split>/frames/<id>.npz     one frame: six uint8 views, float32 lidar, JSON metadata
                                    (and ``<sensor>.<buffer>`` arrays of other stored sensors;
                                    derived sensors such as the radar are not stored)

Every read checks what it reads and names the path in its error; frame files are checked
against their sha256 from the manifest when loaded.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mpnp.files import sha256_file as sha256_of
from scenes.sample import CAMERA_VIEWS, LIDAR, Frame, ObjectAnnotation, QAItem

FORMAT_NAME = "mpnp-scenes"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QUESTIONS = "questions.json"


class DatasetFormatError(ValueError):
    """A dataset file is missing, corrupt or of an unknown format (message names the path)."""


def _object_to_json(obj: ObjectAnnotation) -> dict:
    return asdict(obj)


def _object_from_json(data: dict) -> ObjectAnnotation:
    return ObjectAnnotation(category=data["category"], center=tuple(data["center"]),
                            size=tuple(data["size"]), yaw=float(data["yaw"]),
                            status=data.get("status"))


def qa_to_json(item: QAItem, scene_id: str, light: float) -> dict:
    """nuScenes-QA field names (``sample_token`` = frame id) plus scene and light."""
    return {"sample_token": item.frame_id, "question": item.question, "answer": item.answer,
            "template_type": item.template_type, "num_hop": item.num_hop,
            "scene_token": scene_id, "light": light, **({"meta": item.meta} if item.meta else {})}


def qa_from_json(data: dict, where: str) -> QAItem:
    try:
        return QAItem(frame_id=str(data["sample_token"]), question=str(data["question"]),
                      answer=str(data["answer"]), template_type=str(data["template_type"]),
                      num_hop=int(data["num_hop"]), meta=dict(data.get("meta", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetFormatError(f"{where}: malformed question {data!r} ({exc})") from exc


def _file_key(sensor: str, buffer: str) -> str:
    """The ``.npz`` member of one sensor buffer: camera views and the LiDAR keep the names
    of the first worlds (``CAM_FRONT``, ..., ``lidar``); any other sensor's buffers are
    ``<sensor>.<buffer>``."""
    if sensor == "camera":
        return buffer
    if sensor == "lidar":
        return "lidar"
    return f"{sensor}.{buffer}"


def _sensor_of_key(key: str) -> tuple[str, str]:
    if key in CAMERA_VIEWS:
        return "camera", key
    if key == "lidar":
        return "lidar", LIDAR
    sensor, _, buffer = key.partition(".")
    return sensor, buffer


def save_frame(frame: Frame, path: Path) -> None:
    """Write one frame as a compressed ``.npz`` (no pickles: metadata is a JSON string).

    Sensors whose descriptor says ``stored=False`` (derived from the ground truth, e.g. the
    radar) are not written: :func:`load_frame` derives them again."""
    from scenes.sensors import get_sensor

    frame.validate()
    meta = {"frame_id": frame.frame_id, "scene_id": frame.scene_id,
            "timestamp": frame.timestamp, "light": frame.light,
            "objects": None if frame.objects is None else
            [_object_to_json(o) for o in frame.objects]}
    arrays = {_file_key(sensor, buffer): array
              for sensor, payload in frame.sensors.items() if get_sensor(sensor).stored
              for buffer, array in payload.items()}
    with open(path, "wb") as fh:
        np.savez_compressed(fh, meta=np.array(json.dumps(meta)), **arrays)


def load_frame(path: Path, expected_sha256: str | None = None) -> Frame:
    """Read a frame written by :func:`save_frame`; errors name the file and the problem."""
    from scenes.sensors import SENSORS, derive_sensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"frame file {path} is missing (regenerate the dataset with "
                                "`mpnp scenes generate`)")
    if expected_sha256 is not None and sha256_of(path) != expected_sha256:
        raise DatasetFormatError(f"frame file {path} is corrupt: its sha256 does not match the "
                                 "manifest (regenerate the dataset)")
    sensors: dict[str, dict[str, np.ndarray]] = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            for key in data.files:
                if key == "meta":
                    continue
                sensor, buffer = _sensor_of_key(key)
                if sensor not in SENSORS:
                    continue  # a sensor this installation does not know: not read
                sensors.setdefault(sensor, {})[buffer] = np.array(data[key])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetFormatError(f"frame file {path} is corrupt or not a frame ({exc})") from exc
    for required in ("camera", "lidar"):  # every generated world has both
        if required not in sensors:
            raise DatasetFormatError(f"frame file {path} is corrupt or not a frame (no "
                                     f"{required} data)")
    objects = meta.get("objects")
    frame = Frame(frame_id=meta["frame_id"], scene_id=meta["scene_id"],
                  timestamp=float(meta["timestamp"]), light=float(meta["light"]),
                  sensors=sensors,
                  objects=None if objects is None else [_object_from_json(o) for o in objects])
    try:
        frame.validate()
    except ValueError as exc:
        raise DatasetFormatError(f"frame file {path}: {exc}") from exc
    return derive_sensors(frame)


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{what} {path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{what} {path} must hold a JSON object")
    return data


def write_frame_file(root: Path, split: str, frame: Frame) -> dict:
    """Write ``root/<split>/frames/<id>.npz``; returns the frame's row (id, scene, light,
    file, sha256) for the split's questions file and the manifest."""
    rel = Path(split) / "frames" / f"{frame.frame_id}.npz"
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    save_frame(frame, path)
    return {"frame_id": frame.frame_id, "scene_id": frame.scene_id, "light": frame.light,
            "file": rel.as_posix(), "sha256": sha256_of(path)}


class WorldWriter:
    """Writes a generated world split by split, then the manifest with every file's sha256."""

    def __init__(self, root: Path, config) -> None:
        self.root = Path(root)
        self.config = config
        self.files: dict[str, str] = {}
        self.splits: dict[str, dict] = {}
        self.root.mkdir(parents=True, exist_ok=True)

    def write_frame(self, split: str, frame: Frame) -> dict:
        """Write one frame file and record it; returns its row for the questions file."""
        meta = write_frame_file(self.root, split, frame)
        self.add_frame_file(meta)
        return meta

    def add_frame_file(self, meta: dict) -> None:
        """Record a frame file written by :func:`write_frame_file` (e.g. by a worker)."""
        self.files[meta["file"]] = meta["sha256"]

    def write_split(self, split: str, frames: list[dict], items: list[QAItem]) -> None:
        by_id = {f["frame_id"]: f for f in frames}
        payload = {
            "info": {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "split": split},
            "frames": frames,
            "questions": [qa_to_json(q, by_id[q.frame_id]["scene_id"], by_id[q.frame_id]["light"])
                          for q in items],
        }
        rel = Path(split) / QUESTIONS
        (self.root / split).mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_text(json.dumps(payload, indent=1))
        self.files[rel.as_posix()] = sha256_of(self.root / rel)
        self.splits[split] = {"frames": len(frames), "questions": len(items),
                              "night_frames": sum(f["light"] < 0.35 for f in frames),
                              "scenes": sorted({f["scene_id"] for f in frames})}

    def finish(self, plan) -> Path:
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                    "source": "synthetic", "config": self.config.to_dict(),
                    "splits": self.splits, "files": self.files}
        (self.root / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return self.root


def read_manifest(root: Path) -> dict:
    """Load and check ``root/manifest.json``."""
    manifest = read_json(Path(root) / MANIFEST, "manifest")
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetFormatError(f"{Path(root) / MANIFEST}: not an {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetFormatError(f"{Path(root) / MANIFEST}: format_version "
                                 f"{manifest.get('format_version')} is not supported "
                                 f"(expected {FORMAT_VERSION}); regenerate the dataset")
    return manifest
