"""Frozen unimodal encoders (camera ViT, LiDAR range-image ViT, radar point-set encoder) behind
one interface, and the ground-truth ``oracle`` (a diagnostic upper bound, never served).

Each encoder declares the sensor it reads (``Encoder.sensor``, a name registered in
:mod:`scenes.sensors`); its modality is that sensor's name.

Every encoder maps sensor frames to tokens ``(B, T, D)`` (see :class:`encoders.base.Encoder`)
and is created by name through the registry here::

    from encoders import create_encoder, list_encoders
    camera = create_encoder("camera-vit")            # default config
    tokens = camera.encode(frames)                   # (len(frames), 24, 192)
"""

from __future__ import annotations

from dataclasses import fields

from encoders.base import Encoder, EncoderFormatError, load_encoder
from mpnp.registry import Registry

#: Encoder kind -> class: the one registry type of the project (:mod:`mpnp.registry`), so an
#: unknown kind raises :class:`~mpnp.registry.UnknownNameError` like every other registry.
ENCODERS: Registry[type[Encoder]] = Registry("encoder kind")


def register_encoder(kind: str, cls: type[Encoder]) -> type[Encoder]:
    """Register ``cls`` under ``kind``; raises ``ValueError`` if the name is taken, the
    class is not an :class:`Encoder` of that kind, or it reads an unregistered sensor."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"encoder kind must be a non-empty string, got {kind!r}")
    if not (isinstance(cls, type) and issubclass(cls, Encoder)):
        raise ValueError(f"{cls!r} is not an Encoder subclass")
    if kind in ENCODERS:
        raise ValueError(f"encoder kind {kind!r} is already registered "
                         f"(known: {', '.join(list_encoders())})")
    if cls.kind != kind:
        raise ValueError(f"{cls.__name__}.kind is {cls.kind!r}, cannot register it as {kind!r}")
    if cls.sensor is not None:
        from scenes.sensors import SENSORS

        if cls.sensor not in SENSORS:
            raise ValueError(f"{cls.__name__} reads sensor {cls.sensor!r}, which is not "
                             f"registered (known: {SENSORS.names()}; see scenes/sensors.py)")
        if cls.modality != cls.sensor:
            raise ValueError(f"{cls.__name__}: a sensor encoder's modality is its sensor's "
                             f"name ({cls.sensor!r}), got {cls.modality!r}")
    return ENCODERS.register(kind, cls)


def unregister_encoder(kind: str) -> None:
    """Remove ``kind`` (a test that registers an encoder of its own cleans up with this)."""
    ENCODERS.unregister(kind)


def list_encoders() -> list[str]:
    """Names of every registered encoder kind, sorted."""
    return ENCODERS.names()


def sensor_encoders() -> list[str]:
    """Kinds of the registered encoders that read a sensor (not the diagnostic ones)."""
    return [k for k in list_encoders() if ENCODERS.get(k).sensor is not None]


def encoder_class(kind: str) -> type[Encoder]:
    """The class registered as ``kind`` (:class:`~mpnp.registry.UnknownNameError` if none)."""
    return ENCODERS.get(kind)


def create_encoder(kind: str, **config) -> Encoder:
    """A fresh (randomly initialised, seeded) encoder of ``kind``; ``config`` overrides the
    fields of its config dataclass (unknown fields raise ``ValueError``)."""
    cls = encoder_class(kind)
    known = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"encoder {kind!r} has no config fields {unknown}; "
                         f"known: {sorted(known)}")
    return cls(cls.config_class(**config))


from encoders.camera import CameraViTEncoder  # noqa: E402  (registers itself)
from encoders.lidar import LidarRangeViTEncoder  # noqa: E402
from encoders.lidar_objects import LidarObjectsEncoder  # noqa: E402
from encoders.oracle import OracleEncoder  # noqa: E402
from encoders.radar import RadarPointEncoder  # noqa: E402

register_encoder(CameraViTEncoder.kind, CameraViTEncoder)
register_encoder(LidarRangeViTEncoder.kind, LidarRangeViTEncoder)
register_encoder(LidarObjectsEncoder.kind, LidarObjectsEncoder)
register_encoder(RadarPointEncoder.kind, RadarPointEncoder)
register_encoder(OracleEncoder.kind, OracleEncoder)

__all__ = [
    "ENCODERS",
    "CameraViTEncoder",
    "Encoder",
    "EncoderFormatError",
    "LidarObjectsEncoder",
    "LidarRangeViTEncoder",
    "OracleEncoder",
    "RadarPointEncoder",
    "create_encoder",
    "encoder_class",
    "list_encoders",
    "load_encoder",
    "register_encoder",
    "sensor_encoders",
    "unregister_encoder",
]
