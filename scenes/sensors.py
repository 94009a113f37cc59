"""The sensors a frame can carry: one descriptor per sensor, in one registry.

A :class:`SensorSpec` says everything the rest of the project needs to know about a sensor:

* the message buffers it carries (:class:`BufferSpec`: name, dtype, shape rule), which the
  daemon's wire protocol validates every ingest message against (``daemon/protocol.py``);
* how a message becomes the frame's payload for that sensor (``frame.sensors[name]``, a
  mapping buffer name -> array) and the empty placeholder of a frame that lacks it;
* whether darkness degrades it (``light_dependent``: the camera does, LiDAR and radar do not);
* optionally how to *derive* it from a frame's ground-truth objects (``derive``), so that a
  world generated before the sensor existed still has it (the radar: ``scenes/radar.py``).

Adding a sensor is one :func:`register_sensor` call (see the README's "How to add a
sensor"); the protocol, the frame buffer, the world reader and the modality checks of the
policies read this registry, so nothing in ``daemon/``, ``adapt/`` or ``aligners/`` changes.
Sensor names are also the modality names the aligners and policies use.

numpy only: the daemon's torch-free client imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mpnp.registry import Registry

if TYPE_CHECKING:
    from scenes.sample import Frame

log = logging.getLogger(__name__)

#: A frame's payload for one sensor: buffer name -> array.
Payload = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Dim:
    """One axis of a buffer's shape rule.

    Attributes:
        exact: the axis must have exactly this size (``None``: free).
        min / max: bounds of a free axis.
        limit: name of a :class:`daemon.config.LimitsConfig` field whose value replaces
            ``max`` on the wire (so an operator can tighten or widen it in the config).
    """

    exact: int | None = None
    min: int = 0
    max: int = 1_000_000
    limit: str | None = None

    def bound(self, limits: object | None) -> int:
        if self.limit is not None and limits is not None and hasattr(limits, self.limit):
            return int(getattr(limits, self.limit))
        return self.max

    def describe(self, limits: object | None = None) -> str:
        if self.exact is not None:
            return str(self.exact)
        return f"{self.min}..{self.bound(limits)}"


@dataclass(frozen=True)
class BufferSpec:
    """One buffer of a sensor message (e.g. one camera view, one radar's point list)."""

    name: str
    dtype: str  # a numpy dtype name: "uint8", "float32", ...
    shape: tuple[Dim, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def shape_problem(self, shape: tuple[int, ...] | list[int], limits: object | None = None,
                      check_min: bool = True) -> str | None:
        """Why ``shape`` breaks this buffer's rule, or ``None`` (``check_min=False`` lets a
        free axis be 0: an empty placeholder)."""
        if len(shape) != len(self.shape):
            return f"{self.name}: shape must have {len(self.shape)} axes ({self.rule(limits)}), " \
                   f"got {list(shape)}"
        for size, dim in zip(shape, self.shape):
            low = dim.min if check_min else 0
            if dim.exact is not None and size != dim.exact or \
                    dim.exact is None and not low <= size <= dim.bound(limits):
                return f"{self.name}: shape must be ({self.rule(limits)}), got {list(shape)}"
        return None

    def rule(self, limits: object | None = None) -> str:
        return ", ".join(d.describe(limits) for d in self.shape)


def _empty_payload(spec: SensorSpec) -> dict[str, np.ndarray]:
    return {b.name: np.zeros(tuple(d.exact if d.exact is not None else 0 for d in b.shape),
                             b.np_dtype) for b in spec.buffers}


@dataclass(frozen=True)
class SensorSpec:
    """A sensor's descriptor (see the module docstring).

    Attributes:
        name: the sensor (and modality) name, e.g. ``"radar"``; also the wire header's
            ``sensor`` value.
        buffers: the buffers every message of this sensor carries, all of them, each once.
        same_shape: every buffer must have the same shape (the six camera views).
        finite: float buffers must hold no NaN or inf.
        light_dependent: darkness degrades the sensor (a context policy may drop it at night).
        derive: ``frame -> payload`` from the frame's ground truth, for worlds that did not
            store this sensor (``None``: the sensor is stored, or absent).
        stored: generated worlds write this sensor to their frame files (a derived sensor is
            not stored: it is recomputed, bit-identically, when a frame is loaded).
        rate_hz: the nominal message rate (the simulated vehicle's default).
        description: one line for docs and ``--help``.
    """

    name: str
    buffers: tuple[BufferSpec, ...]
    same_shape: bool = False
    finite: bool = True
    light_dependent: bool = False
    derive: Callable[[Frame], Payload | None] | None = None
    stored: bool = True
    rate_hz: float = 10.0
    description: str = ""
    _buffer_index: dict[str, BufferSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"sensor name must be letters, digits, '-' or '_', got {self.name!r}")
        names = [b.name for b in self.buffers]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"sensor {self.name!r}: buffers need distinct names, got {names}")
        object.__setattr__(self, "_buffer_index", {b.name: b for b in self.buffers})

    @property
    def buffer_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.buffers)

    def buffer(self, name: str) -> BufferSpec | None:
        return self._buffer_index.get(name)

    def empty(self) -> dict[str, np.ndarray]:
        """The placeholder payload of a frame without this sensor (every free axis 0)."""
        return _empty_payload(self)

    def payload_problem(self, payload: Payload, limits: object | None = None,
                        check_min: bool = True) -> str | None:
        """Why ``payload`` is not a valid payload of this sensor, or ``None`` (used by
        :meth:`scenes.sample.Frame.validate`; the wire protocol checks the same rules before
        it even views a buffer)."""
        missing = [n for n in self.buffer_names if n not in payload]
        if missing:
            return f"{self.name}: missing buffers {missing}"
        extra = sorted(set(payload) - set(self.buffer_names))
        if extra:
            return f"{self.name}: unexpected buffers {extra}"
        shapes = set()
        for spec in self.buffers:
            array = payload[spec.name]
            if not isinstance(array, np.ndarray) or array.dtype != spec.np_dtype:
                kind = getattr(array, "dtype", type(array).__name__)
                return f"{self.name}: {spec.name} must be {spec.dtype}, got {kind}"
            problem = spec.shape_problem(array.shape, limits, check_min)
            if problem:
                return f"{self.name}: {problem}"
            if self.finite and array.dtype.kind == "f" and not np.isfinite(array).all():
                return f"{self.name}: {spec.name} holds NaN or inf"
            shapes.add(array.shape)
        if self.same_shape and len(shapes) > 1:
            return f"{self.name}: buffers differ in shape: {sorted(shapes)}"
        return None


SENSORS: Registry[SensorSpec] = Registry("sensor", builtin_modules=("scenes.builtin_sensors",))


def register_sensor(spec: SensorSpec) -> SensorSpec:
    """Register ``spec`` under its name (a second sensor of one name raises ``ValueError``)."""
    if not isinstance(spec, SensorSpec):
        raise ValueError(f"expected a SensorSpec, got {type(spec).__name__}")
    SENSORS.load()  # built-ins first, so that a clash with one is reported here
    return SENSORS.register(spec.name, spec)


def get_sensor(name: str) -> SensorSpec:
    """The descriptor of ``name``; an unknown name raises
    :class:`~mpnp.registry.UnknownNameError` (a ``ValueError``) listing the known ones."""
    return SENSORS.get(name)


def sensor_names() -> list[str]:
    """Every registered sensor name, sorted."""
    return SENSORS.names()


def derive_sensors(frame: Frame) -> Frame:
    """Add to ``frame`` every registered sensor it lacks that can be derived from its ground
    truth (so a world generated before that sensor existed gains it); returns ``frame``."""
    for name in SENSORS.names():
        spec = SENSORS.get(name)
        if name not in frame.sensors and spec.derive is not None:
            payload = spec.derive(frame)
            if payload is not None:
                frame.sensors[name] = dict(payload)
    return frame


def unregister_sensor(name: str) -> None:
    """Remove a sensor (tests that register one of their own clean up with this)."""
    SENSORS.unregister(name)
