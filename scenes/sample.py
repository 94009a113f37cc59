"""The sample types every data source yields and every consumer reads.

A :class:`Frame` is one synchronized sensor snapshot (sensors by name: six camera views, one
LiDAR sweep, five radars, ... — see :mod:`scenes.sensors`);
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
        sensors: sensor name -> its payload (buffer name -> array), each as its descriptor
            in :mod:`scenes.sensors` says: ``sensors["camera"]`` holds the six views of
            :data:`CAMERA_VIEWS` (``uint8 (H, W, 3)``), ``sensors["lidar"][LIDAR]`` the sweep
            (``float32 (N, 4)``: x, y, z, intensity), ``sensors["radar"]`` five radars'
            returns (``scenes/radar.py``). A frame carries the sensors its source has.
        objects: ground truth when the source knows it (synthetic world, nuScenes boxes).
    """

    frame_id: str
    scene_id: str
    timestamp: float
    light: float
    sensors: dict[str, dict[str, np.ndarray]]
    objects: list[ObjectAnnotation] | None = None

    @classmethod
    def from_rig(cls, frame_id: str, scene_id: str, timestamp: float, light: float,
                 cameras: dict[str, np.ndarray], lidar: np.ndarray,
                 objects: list[ObjectAnnotation] | None = None,
                 **others: dict[str, np.ndarray]) -> Frame:
        """A frame of the camera + LiDAR rig (and any ``others`` sensors by name)."""
        return cls(frame_id, scene_id, timestamp, light,
                   {"camera": dict(cameras), "lidar": {LIDAR: lidar}, **others}, objects)

    @property
    def is_night(self) -> bool:
        return self.light < NIGHT_BELOW

    def payload(self, sensor: str) -> dict[str, np.ndarray]:
        """``sensor``'s payload, or its empty placeholder when the frame lacks it."""
        if sensor in self.sensors:
            return self.sensors[sensor]
        from scenes.sensors import get_sensor

        return get_sensor(sensor).empty()

    @property
    def cameras(self) -> dict[str, np.ndarray]:
        """The camera views (read-only shorthand for ``payload("camera")``)."""
        return self.payload("camera")

    @property
    def lidar(self) -> np.ndarray:
        """The LiDAR sweep (read-only shorthand for ``payload("lidar")[LIDAR]``)."""
        return self.payload("lidar")[LIDAR]

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first malformed sensor payload (every sensor must
        be registered in :mod:`scenes.sensors` and follow its descriptor; sizes of 0 are
        allowed: the empty placeholder of an unused sensor)."""
        from scenes.sensors import SENSORS

        for name, payload in self.sensors.items():
            if name not in SENSORS:
                raise ValueError(f"frame {self.frame_id}: unknown sensor {name!r}; known: "
                                 f"{SENSORS.names()}")
            problem = SENSORS.get(name).payload_problem(payload, check_min=False)
            if problem:
                raise ValueError(f"frame {self.frame_id}: {problem}")

    def content_digest(self) -> str:
        """sha256 of what the frame holds (sensors, light, ground truth), not of its id:
        frame ids repeat across worlds, contents do not."""
        digest = hashlib.sha256()
        digest.update(repr(float(self.light)).encode())
        for sensor in sorted(self.sensors):
            for name in sorted(self.sensors[sensor]):
                array = np.ascontiguousarray(self.sensors[sensor][name])
                # camera views and the LiDAR keep their earlier labels (same digests)
                label = name if sensor == "camera" else "lidar" if sensor == "lidar" \
                    else f"{sensor}/{name}"
                digest.update(f"{label}|{array.dtype}|{array.shape}".encode())
                digest.update(array.tobytes())
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
