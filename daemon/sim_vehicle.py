"""A simulated vehicle: publishes camera and LiDAR frames at realistic rates.

Six cameras at ≈12 Hz and one LiDAR at ≈20 Hz (configurable), over the ingest protocol, from a
:class:`FrameSource`. The default source is the synthetic world
(:class:`scenes.synthetic.SyntheticWorld`); the drive goes day -> dusk -> night through the
light level passed to the world. World frames are rendered every ``world_interval_s`` (the
world's own 0.5 s frame spacing; rendering a frame takes ~0.1 s on a small CPU), and each sensor
tick sends the latest world frame with the sensor's own timestamp, like a real rig whose
sensors run faster than the scene changes. A full send queue drops the frame (counted), it
never blocks the vehicle.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon.client import SensorPublisher
from scenes.sample import Frame

log = logging.getLogger(__name__)


class FrameSource(Protocol):
    def frame(self, index: int, light: float) -> Frame:
        """The ``index``-th frame of the drive, rendered at ``light`` (1 day .. 0 night)."""
        ...


class SyntheticFrameSource:
    """Frames from the synthetic world; consecutive indices walk through its scenes."""

    def __init__(self, seed: int = 0, **world_options: Any) -> None:
        from scenes.synthetic import SyntheticWorld, WorldConfig  # lazy: heavier imports

        names = {f.name for f in dataclasses.fields(WorldConfig)}
        unknown = sorted(set(world_options) - names)
        if unknown:
            raise ValueError(f"unknown world options {unknown}; known: {sorted(names)}")
        self.config = WorldConfig(seed=seed, **world_options)
        self.world = SyntheticWorld(self.config)

    def frame(self, index: int, light: float) -> Frame:
        per_scene = self.config.frames_per_scene
        scene_id = f"sim-{index // per_scene:04d}"
        frame, _ = self.world.make_frame(scene_id, index % per_scene, light)
        return frame


@dataclass
class SimVehicleConfig:
    """Rates and the light schedule (day for ``day_s``, dusk ramp, night for ``night_s``).

    ``sensors_hz`` adds any other registered sensor the frames carry (``{"radar": 13.0}``)."""

    endpoint: str = "tcp://127.0.0.1:5555"
    camera_hz: float = 12.0
    lidar_hz: float = 20.0
    sensors_hz: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None
    day_s: float = 20.0
    dusk_s: float = 10.0
    night_s: float = 20.0
    day_light: float = 1.0
    night_light: float = 0.05
    loop: bool = True
    world_interval_s: float = 0.5
    send_ambient: bool = False
    hwm: int = 4

    def __post_init__(self) -> None:
        for name in ("camera_hz", "lidar_hz", "world_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sim-vehicle {name} must be > 0, got {getattr(self, name)}")
        from scenes.sensors import get_sensor

        for name, hz in self.sensors_hz.items():
            get_sensor(name)  # an unknown sensor raises, naming the known ones
            if name in ("camera", "lidar") or hz <= 0:
                raise ValueError(f"sim-vehicle sensors_hz[{name!r}] must be > 0 and not camera "
                                 f"or lidar (they have their own rates), got {hz}")
        for name in ("day_s", "dusk_s", "night_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"sim-vehicle {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.night_light <= self.day_light <= 1:
            raise ValueError("need 0 <= night_light <= day_light <= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")

    def light_at(self, t: float) -> float:
        """Light level at ``t`` seconds into the drive."""
        cycle = self.day_s + self.dusk_s + self.night_s
        if self.loop and cycle > 0:
            t = t % cycle
        if t < self.day_s:
            return self.day_light
        if t < self.day_s + self.dusk_s:
            fraction = (t - self.day_s) / self.dusk_s
            return self.day_light + fraction * (self.night_light - self.day_light)
        return self.night_light


@dataclass
class SimStats:
    camera_sent: int = 0
    lidar_sent: int = 0
    sensors_sent: dict[str, int] = field(default_factory=dict)  # the other sensors
    dropped: int = 0
    world_frames: int = 0
    elapsed_s: float = 0.0
    lights: list[float] = field(default_factory=list)

    def rates(self) -> dict[str, float]:
        t = max(self.elapsed_s, 1e-9)
        return {"camera_hz": self.camera_sent / t, "lidar_hz": self.lidar_sent / t,
                **{f"{name}_hz": sent / t for name, sent in self.sensors_sent.items()}}


def _next_tick(scheduled: float, period: float, now: float) -> float:
    """The next tick; a sensor more than one period late skips ahead instead of bursting."""
    nxt = scheduled + period
    return now if nxt < now - period else nxt


class SimVehicle:
    def __init__(
        self, config: SimVehicleConfig, source: FrameSource,
        publisher: SensorPublisher | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self._own_publisher = publisher is None
        self.publisher = publisher or SensorPublisher(config.endpoint, hwm=config.hwm)

    def run(self, stop: threading.Event | None = None) -> SimStats:
        cfg = self.config
        stop = stop or threading.Event()
        stats = SimStats()
        start = time.monotonic()
        wall0 = time.time()
        next_camera = next_lidar = next_world = 0.0
        next_other = dict.fromkeys(cfg.sensors_hz, 0.0)
        world_index = 0
        frame: Frame | None = None
        light = cfg.light_at(0.0)
        try:
            while not stop.is_set():
                t = time.monotonic() - start
                if cfg.duration_s is not None and t >= cfg.duration_s:
                    break
                if frame is None or t >= next_world:
                    light = cfg.light_at(t)
                    frame = self.source.frame(world_index, light)
                    world_index += 1
                    stats.world_frames += 1
                    stats.lights.append(light)
                    next_world = _next_tick(next_world, cfg.world_interval_s, t)
                    continue  # rendering took time: re-read the clock
                stamp = wall0 + t
                if t >= next_lidar:
                    self._count(stats, "lidar", self.publisher.send_lidar(frame, stamp))
                    next_lidar = _next_tick(next_lidar, 1.0 / cfg.lidar_hz, t)
                if t >= next_camera:
                    ambient = light if cfg.send_ambient else None
                    self._count(stats, "camera",
                                self.publisher.send_camera(frame, stamp, ambient))
                    next_camera = _next_tick(next_camera, 1.0 / cfg.camera_hz, t)
                for name, hz in cfg.sensors_hz.items():
                    if t >= next_other[name] and name in frame.sensors:
                        sent = self.publisher.send_sensor(frame, name, stamp)
                        if sent:
                            stats.sensors_sent[name] = stats.sensors_sent.get(name, 0) + 1
                        else:
                            stats.dropped += 1
                        next_other[name] = _next_tick(next_other[name], 1.0 / hz, t)
                wait = min(next_lidar, next_camera, next_world, *next_other.values()) - (
                    time.monotonic() - start)
                if wait > 0:
                    stop.wait(wait)
        finally:
            stats.elapsed_s = time.monotonic() - start
            if self._own_publisher:
                self.publisher.close()
        log.info("sim-vehicle: %s in %.1fs, %d dropped", stats.rates(), stats.elapsed_s,
                 stats.dropped)
        return stats

    @staticmethod
    def _count(stats: SimStats, sensor: str, sent: bool) -> None:
        if not sent:
            stats.dropped += 1
        elif sensor == "lidar":
            stats.lidar_sent += 1
        else:
            stats.camera_sent += 1
