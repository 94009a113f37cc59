"""A simulated vehicle: publishes camera and LiDAR frames at realistic rates.

Six cameras at ≈12 Hz and one LiDAR at ≈20 Hz (configurable), over the ingest protocol, from a
:class:`FrameSource`. The default source is the synthetic world
(:class:`scenes.synthetic.SyntheticWorld`); the drive goes day -> dusk -> night through the
light level passed to the world. World frames are rendered every ``world_interval_s`` (the
world's own 0.5 s frame spacing), and each sensor tick sends the latest world frame with the
sensor's own timestamp, like a real rig whose sensors run faster than the scene changes.
Rendering a frame takes 0.1–0.3 s on a small loaded CPU — longer than the LiDAR's 50 ms
period — so frames are rendered one ahead in a background thread and a sensor tick never
waits for one (a frame not ready in time is counted in ``SimStats.late_frames`` and the
previous one is sent meanwhile). A full send queue drops the message (counted); it never
blocks the vehicle.

With ``objects_every = k > 0`` the vehicle is also a perception stack: every k-th world
frame, once its sensors went out, its ground-truth boxes are sent as an ``objects`` request
(live samples, PROTOCOL.md) from a background thread with its own client, through a bounded
queue (a full queue drops the list, counted).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
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
    objects_every: int = 0
    query_endpoint: str = "tcp://127.0.0.1:5556"
    objects_context: str | None = None

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
        if self.objects_every < 0:
            raise ValueError(f"objects_every must be >= 0 (0: off), got {self.objects_every}")
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
    late_frames: int = 0  # world frames not rendered by the time they were due
    objects_sent: int = 0  # object lists the daemon accepted
    objects_failed: int = 0  # refused, timed out, or dropped by the full queue
    samples_stored: int = 0  # live samples the daemon stored from them
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
        renderer = _Renderer(self.source, cfg)
        objects = _ObjectsSender(cfg, stats) if cfg.objects_every else None
        world_index = 0
        try:
            light, frame = renderer.take(timeout=None)  # the first frame before the clock starts
            stats.world_frames += 1
            stats.lights.append(light)
            start = time.monotonic()
            wall0 = time.time()
            next_camera = next_lidar = 0.0
            next_other = dict.fromkeys(cfg.sensors_hz, 0.0)
            next_world = cfg.world_interval_s
            late = False  # the due world frame is not rendered yet
            while not stop.is_set():
                t = time.monotonic() - start
                if cfg.duration_s is not None and t >= cfg.duration_s:
                    break
                if t >= next_world:
                    taken = renderer.take(timeout=0.0)
                    if taken is None:  # not rendered yet: keep sending the previous frame
                        stats.late_frames += 0 if late else 1
                        late = True
                        next_world = t + min(0.01, cfg.world_interval_s)
                    else:
                        if objects is not None and world_index % cfg.objects_every == 0:
                            objects.offer(frame)  # its sensors went out meanwhile
                        world_index += 1
                        light, frame = taken
                        late = False
                        stats.world_frames += 1
                        stats.lights.append(light)
                        next_world = _next_tick(next_world, cfg.world_interval_s, t)
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
            stats.elapsed_s = time.monotonic() - start
        finally:
            renderer.close()
            if objects is not None:
                objects.close()
            if self._own_publisher:
                self.publisher.close()
        log.info("sim-vehicle: %s in %.1fs, %d dropped, %d world frames late", stats.rates(),
                 stats.elapsed_s, stats.dropped, stats.late_frames)
        return stats

    @staticmethod
    def _count(stats: SimStats, sensor: str, sent: bool) -> None:
        if not sent:
            stats.dropped += 1
        elif sensor == "lidar":
            stats.lidar_sent += 1
        else:
            stats.camera_sent += 1


class _ObjectsSender:
    """Sends frames' ground-truth object lists as ``objects`` requests, off the sensor loop."""

    def __init__(self, config: SimVehicleConfig, stats: SimStats) -> None:
        self._config = config
        self._stats = stats
        self._queue: queue.Queue[Frame | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="sim-vehicle-objects",
                                        daemon=True)
        self._thread.start()

    def offer(self, frame: Frame) -> None:
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self._stats.objects_failed += 1

    def _run(self) -> None:
        from daemon.client import Client, DaemonError, DaemonTimeout
        from daemon.teaching import objects_to_wire

        with Client(self._config.query_endpoint, timeout_s=10.0) as client:
            while (frame := self._queue.get()) is not None:
                try:
                    reply = client.objects(frame.frame_id, objects_to_wire(frame.objects),
                                           context=self._config.objects_context)
                except (DaemonError, DaemonTimeout) as exc:
                    log.warning("sim-vehicle: objects of %s refused: %s", frame.frame_id, exc)
                    self._stats.objects_failed += 1
                    continue
                self._stats.objects_sent += 1
                self._stats.samples_stored += reply["stored"]

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=15.0)


#: How many world frames may be rendered (and handed out by the source) ahead of the one the
#: sensors are sending: one waits in the renderer's queue, one more waits to be queued.
RENDER_AHEAD = 2


class _Renderer:
    """Renders the drive's world frames one ahead, in a background thread.

    Frame ``k`` is due at ``k · world_interval_s`` and is rendered at the light of that moment,
    so the drive is the same whatever the CPU load; only *when* a frame becomes available
    depends on it. An exception in the source is raised by :meth:`take`.
    """

    def __init__(self, source: FrameSource, config: SimVehicleConfig) -> None:
        self._source = source
        self._config = config
        self._ready: queue.Queue[tuple[float, Frame] | BaseException] = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-vehicle-render",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        index = 0
        while not self._closed.is_set():
            light = self._config.light_at(index * self._config.world_interval_s)
            try:
                item: tuple[float, Frame] | BaseException = (light,
                                                             self._source.frame(index, light))
            except BaseException as exc:  # handed to the sending thread, which raises it
                item = exc
            while not self._closed.is_set():
                try:
                    self._ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            index += 1

    def take(self, timeout: float | None) -> tuple[float, Frame] | None:
        """The next ``(light, frame)``; ``None`` if none is ready within ``timeout`` seconds
        (``0``: don't wait; ``None``: wait as long as it takes)."""
        try:
            item = self._ready.get(block=timeout != 0.0, timeout=timeout or None)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5.0)
