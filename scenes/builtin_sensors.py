"""The built-in sensors: the nuScenes rig's six cameras, its LiDAR and its five radars.

Imported by the sensor registry (:data:`scenes.sensors.SENSORS`) on its first use; a new
sensor is registered the same way from any module (``register_sensor(SensorSpec(...))``).
"""

from __future__ import annotations

from scenes.radar import RADAR_FIELDS, RADAR_VIEWS, radar_payload
from scenes.sample import CAMERA_VIEWS, LIDAR
from scenes.sensors import BufferSpec, Dim, SensorSpec, register_sensor

_SIDE = Dim(min=1, max=4096, limit="max_image_side")

CAMERA = register_sensor(SensorSpec(
    name="camera",
    buffers=tuple(BufferSpec(view, "uint8", (_SIDE, _SIDE, Dim(exact=3)))
                  for view in CAMERA_VIEWS),
    same_shape=True, light_dependent=True, rate_hz=12.0,
    description="six uint8 RGB views (H, W, 3) of one shape, nuScenes order"))

LIDAR_SENSOR = register_sensor(SensorSpec(
    name="lidar",
    buffers=(BufferSpec(LIDAR, "float32",
                        (Dim(max=1_000_000, limit="max_lidar_points"), Dim(exact=4))),),
    rate_hz=20.0,
    description="one sweep, float32 (N, 4): x, y, z, intensity (ego frame)"))

RADAR = register_sensor(SensorSpec(
    name="radar",
    buffers=tuple(BufferSpec(name, "float32",
                             (Dim(max=4096),
                              Dim(exact=len(RADAR_FIELDS))))
                  for name in RADAR_VIEWS),
    derive=radar_payload, stored=False, rate_hz=13.0,
    description="five radars, float32 (N, 5) each: x, y, z, v_radial, rcs (ego frame; "
                "v_radial ego-motion compensated)"))
