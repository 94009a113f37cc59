"""The sample types every data source yields and every consumer reads.

A :class:`Frame` is one synchronized sensor snapshot (six camera views + one LiDAR sweep);
a :class:`QAItem` is one question about a frame. Several questions refer to the same frame,
which is why they are separate: encoders run once per frame, not once per question.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

#: The nuScenes camera rig, in its customary order (front, then clockwise).
CAMERA_VIEWS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_RIGHT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_FRONT_LEFT",
)
LIDAR = "LIDAR_TOP"

#: Light levels below this count as night (1.0 = full daylight, 0.0 = no ambient light).
NIGHT_BELOW = 0.35


@dataclass
class ObjectAnnotation:
    """A ground-truth object in ego coordinates (x forward, y left, z up; metres, radians)."""

    category: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]  # (width, length, height)
    yaw: float
    status: str | None = None  # moving / parked / stopped / standing / with rider / ...


@dataclass
class Frame:
    """One synchronized sensor snapshot.

    Attributes:
        frame_id: unique id (the nuScenes ``sample_token`` for real data).
        scene_id: the scene (drive) the frame belongs to; splits are made by scene.
        timestamp: seconds.
        light: ambient light, 1.0 day .. 0.0 night (real data: 1.0 or 0.0 from the scene
            description).
        cameras: view name -> ``uint8`` array ``(H, W, 3)``, all six of :data:`CAMERA_VIEWS`.
        lidar: ``float32`` array ``(N, 4)``: x, y, z, intensity (ego/sensor frame).
        objects: ground truth when the source knows it (synthetic world, nuScenes boxes).
    """

    frame_id: str
    scene_id: str
    timestamp: float
    light: float
    cameras: dict[str, np.ndarray]
    lidar: np.ndarray
    objects: list[ObjectAnnotation] | None = None

    @property
    def is_night(self) -> bool:
        return self.light < NIGHT_BELOW

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first malformed field."""
        missing = [v for v in CAMERA_VIEWS if v not in self.cameras]
        if missing:
            raise ValueError(f"frame {self.frame_id}: missing camera views {missing}")
        shape = None
        for view in CAMERA_VIEWS:
            img = self.cameras[view]
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(
                    f"frame {self.frame_id}: {view} must be uint8 (H, W, 3), "
                    f"got {img.dtype} {img.shape}"
                )
            if shape is not None and img.shape != shape:
                raise ValueError(f"frame {self.frame_id}: camera views differ in shape")
            shape = img.shape
        if self.lidar.dtype != np.float32 or self.lidar.ndim != 2 or self.lidar.shape[1] != 4:
            raise ValueError(
                f"frame {self.frame_id}: lidar must be float32 (N, 4), "
                f"got {self.lidar.dtype} {self.lidar.shape}"
            )
        if not np.isfinite(self.lidar).all():
            raise ValueError(f"frame {self.frame_id}: lidar holds NaN or inf")

    def content_digest(self) -> str:
        """sha256 of what the frame holds (sensors, light, ground truth), not of its id:
        frame ids repeat across worlds, contents do not."""
        digest = hashlib.sha256()
        digest.update(repr(float(self.light)).encode())
        for view in sorted(self.cameras):
            image = np.ascontiguousarray(self.cameras[view])
            digest.update(f"{view}|{image.dtype}|{image.shape}".encode())
            digest.update(image.tobytes())
        lidar = np.ascontiguousarray(self.lidar)
        digest.update(f"lidar|{lidar.dtype}|{lidar.shape}".encode())
        digest.update(lidar.tobytes())
        objects = None if self.objects is None else [asdict(o) for o in self.objects]
        digest.update(json.dumps(objects, sort_keys=True).encode())
        return digest.hexdigest()


@dataclass
class QAItem:
    """One nuScenes-QA style question about one frame."""

    frame_id: str
    question: str
    answer: str
    template_type: str  # exist / count / object / status / comparison
    num_hop: int  # 0 or 1
    meta: dict = field(default_factory=dict)
