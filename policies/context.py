"""Context policies: which modalities are useful right now.

A policy observes sensor context (:class:`ContextSample`) and answers :meth:`desired`, the
modality set the model should run with. Policies live in a registry
(:func:`register_policy` / :func:`create_policy` / :func:`list_policies`). The
:class:`ModalitySelector` adds the operator override on top of any policy: in ``forced`` mode
the operator's set wins until it is switched back to ``auto``.

The :class:`LightLevelPolicy` is the paper's scenario: day -> camera, night -> LiDAR (or
camera + LiDAR). Light is taken from an ambient-light field in the sensor header when one is
sent, otherwise estimated as the mean luminance of the camera views. Two thresholds
(hysteresis) and a dwell time keep dusk from making it flap: the policy only switches after the
light has stayed beyond the far threshold for ``dwell_s`` seconds of sensor time.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from mpnp.registry import Registry

log = logging.getLogger(__name__)

def known_modalities() -> frozenset[str]:
    """The modalities a policy may ask for: the registered sensors (:mod:`scenes.sensors`)."""
    from scenes.sensors import sensor_names

    return frozenset(sensor_names())


def modality_set(names: Iterable[str], where: str = "modalities") -> frozenset[str]:
    """Validate and freeze a modality set (raise ``ValueError`` naming ``where``)."""
    if isinstance(names, str):
        raise ValueError(f"{where} must be a list of modality names, got the string {names!r}")
    result = frozenset(str(n) for n in names)
    known = known_modalities()
    unknown = sorted(result - known)
    if unknown:
        raise ValueError(f"{where}: unknown modalities {unknown}; known: {sorted(known)}")
    if not result:
        raise ValueError(f"{where} must name at least one modality")
    return result


@dataclass(frozen=True)
class ContextSample:
    """What a policy sees of one sensor message.

    Attributes:
        timestamp: sensor time in seconds (the dwell time runs on this clock).
        cameras: view name -> ``uint8 (H, W, 3)`` image, or ``None`` for non-camera sensors.
        ambient_light: an ambient-light reading in 0..1 sent by the vehicle, if any.
    """

    timestamp: float
    cameras: Mapping[str, np.ndarray] | None = None
    ambient_light: float | None = None


def mean_luminance(views: Mapping[str, np.ndarray], stride: int = 8) -> float:
    """Mean Rec. 601 luma of the views in 0..1, on a strided subsample (cheap at 12 Hz)."""
    if not views:
        raise ValueError("mean_luminance needs at least one camera view")
    total = 0.0
    for image in views.values():
        sub = np.asarray(image[::stride, ::stride, :3], dtype=np.float32)
        luma = 0.299 * sub[..., 0] + 0.587 * sub[..., 1] + 0.114 * sub[..., 2]
        total += float(luma.mean()) if luma.size else 0.0
    return total / len(views) / 255.0


class ContextPolicy(ABC):
    """Turns observed context into the desired modality set."""

    name: str = ""

    @abstractmethod
    def observe(self, sample: ContextSample) -> None:
        """Take one sensor observation into account."""

    @abstractmethod
    def desired(self) -> frozenset[str]:
        """The modality set this policy wants now."""

    def data_context(self, modalities: Iterable[str]) -> str | None:
        """The context (a data split such as ``"day"`` / ``"night"``) whose labelled samples
        train and validate a state for ``modalities``; ``None``: the policy has no view (the
        backend then uses its configured default). This, not a modality's name, decides
        which data an adaptation runs on."""
        return None

    def describe(self) -> dict:
        """A JSON-able summary for ``status``."""
        return {"policy": self.name, "desired": sorted(self.desired())}


POLICIES: Registry[type[ContextPolicy]] = Registry("context policy")


def register_policy(name: str) -> Callable[[type[ContextPolicy]], type[ContextPolicy]]:
    """Class decorator: register a policy under ``name`` (duplicates raise)."""

    def wrap(cls: type[ContextPolicy]) -> type[ContextPolicy]:
        POLICIES.register(name, cls)
        cls.name = name
        return cls

    return wrap


def list_policies() -> list[str]:
    return POLICIES.names()


def create_policy(name: str, **options: object) -> ContextPolicy:
    """Build a registered policy; an unknown name is a :class:`~mpnp.registry.UnknownNameError`
    (a ``ValueError``) listing the known ones."""
    return POLICIES.get(name)(**options)


@dataclass(frozen=True)
class LightLevelConfig:
    """Light-level policy settings.

    Attributes:
        day_modalities / night_modalities: the sets to use by day and by night.
        night_below: switch to night once light stays below this for ``dwell_s``.
        day_above: switch back to day once light stays above this for ``dwell_s``.
        dwell_s: seconds (sensor time) a crossing must persist before the switch.
        source: ``auto`` (header field if sent, else luminance), ``header`` or ``luminance``.
        luminance_dark / luminance_bright: mean luminance of the views at night (light 0)
            and in full daylight (light 1); the estimate maps linearly between them. The
            defaults are calibrated on the synthetic world's renderer (0.22 night, 0.63
            day, 0.36 at dusk light 0.45); calibrate them for a real camera rig.
        initial: ``day`` or ``night``: the state before any observation.
    """

    day_modalities: tuple[str, ...] = ("camera",)
    night_modalities: tuple[str, ...] = ("lidar",)
    night_below: float = 0.25
    day_above: float = 0.35
    dwell_s: float = 3.0
    source: str = "auto"
    luminance_dark: float = 0.2
    luminance_bright: float = 0.6
    initial: str = "day"

    def __post_init__(self) -> None:
        modality_set(self.day_modalities, "day_modalities")
        modality_set(self.night_modalities, "night_modalities")
        if not 0.0 <= self.night_below < self.day_above <= 1.0:
            raise ValueError(
                "need 0 <= night_below < day_above <= 1 (the gap is the hysteresis), got "
                f"night_below={self.night_below}, day_above={self.day_above}"
            )
        if self.dwell_s < 0:
            raise ValueError(f"dwell_s must be >= 0, got {self.dwell_s}")
        if self.source not in ("auto", "header", "luminance"):
            raise ValueError(f"source must be auto, header or luminance, got {self.source!r}")
        if not 0.0 <= self.luminance_dark < self.luminance_bright <= 1.0:
            raise ValueError(
                "need 0 <= luminance_dark < luminance_bright <= 1, got "
                f"{self.luminance_dark}, {self.luminance_bright}"
            )
        if self.initial not in ("day", "night"):
            raise ValueError(f"initial must be day or night, got {self.initial!r}")


@register_policy("light-level")
class LightLevelPolicy(ContextPolicy):
    """Day/night from the light level, with hysteresis and a dwell time."""

    def __init__(self, config: LightLevelConfig | None = None, **options: object) -> None:
        if config is not None and options:
            raise ValueError("give either a LightLevelConfig or keyword options, not both")
        self.config = config or LightLevelConfig(**options)  # type: ignore[arg-type]
        self.state = self.config.initial
        self.light: float | None = None
        self.light_source: str | None = None
        self._crossing_since: float | None = None
        self.switches = 0

    def estimate(self, sample: ContextSample) -> tuple[float, str] | None:
        """Light in 0..1 from one sample and where it came from, or ``None``."""
        source = self.config.source
        if sample.ambient_light is not None and source in ("auto", "header"):
            return min(max(float(sample.ambient_light), 0.0), 1.0), "header"
        if sample.cameras and source in ("auto", "luminance"):
            lum = mean_luminance(sample.cameras)
            lo, hi = self.config.luminance_dark, self.config.luminance_bright
            return min(max((lum - lo) / (hi - lo), 0.0), 1.0), "luminance"
        return None

    def observe(self, sample: ContextSample) -> None:
        estimate = self.estimate(sample)
        if estimate is None:
            return
        self.light, self.light_source = estimate
        cfg = self.config
        crossing = (self.state == "day" and self.light < cfg.night_below) or (
            self.state == "night" and self.light > cfg.day_above
        )
        if not crossing:
            self._crossing_since = None
            return
        if self._crossing_since is None:
            self._crossing_since = sample.timestamp
        if sample.timestamp - self._crossing_since >= cfg.dwell_s:
            self.state = "night" if self.state == "day" else "day"
            self._crossing_since = None
            self.switches += 1
            log.info("light-level policy: %s (light %.3f from %s)", self.state, self.light,
                     self.light_source)

    def desired(self) -> frozenset[str]:
        names = self.config.day_modalities if self.state == "day" else self.config.night_modalities
        return frozenset(names)

    def data_context(self, modalities: Iterable[str]) -> str:
        """``night`` for the night set, ``day`` for the day set, else the current state."""
        wanted = frozenset(modalities)
        if wanted == frozenset(self.config.night_modalities):
            return "night"
        if wanted == frozenset(self.config.day_modalities):
            return "day"
        return self.state

    def describe(self) -> dict:
        return {
            "policy": self.name,
            "state": self.state,
            "light": self.light,
            "light_source": self.light_source,
            "switches": self.switches,
            "desired": sorted(self.desired()),
        }


@register_policy("fixed")
class FixedPolicy(ContextPolicy):
    """Always the same set (a development machine without a context signal)."""

    def __init__(self, modalities: Iterable[str] = ("camera",), context: str | None = None
                 ) -> None:
        self.modalities = modality_set(modalities, "fixed policy modalities")
        self.context = context  # the data context of every adaptation (None: the backend's)

    def observe(self, sample: ContextSample) -> None:
        return None

    def data_context(self, modalities: Iterable[str]) -> str | None:
        return self.context

    def desired(self) -> frozenset[str]:
        return self.modalities


@dataclass
class ModalitySelector:
    """A policy plus the operator override (``auto`` or ``forced``)."""

    policy: ContextPolicy
    forced: frozenset[str] | None = field(default=None)

    @property
    def mode(self) -> str:
        return "auto" if self.forced is None else "forced"

    def force(self, modalities: Iterable[str]) -> None:
        self.forced = modality_set(modalities, "forced modalities")
        log.info("operator override: forced modalities %s", sorted(self.forced))

    def release(self) -> None:
        self.forced = None
        log.info("operator override released: back to %s policy", self.policy.name)

    def observe(self, sample: ContextSample) -> None:
        self.policy.observe(sample)

    def desired(self) -> frozenset[str]:
        return self.forced if self.forced is not None else self.policy.desired()

    def data_context(self, modalities: Iterable[str]) -> str | None:
        """The policy's word on which context's data trains ``modalities`` (a forced set
        too: the operator picks the sensors, the context is still the policy's)."""
        return self.policy.data_context(modalities)

    def describe(self) -> dict:
        info = self.policy.describe()
        info.update(mode=self.mode, desired=sorted(self.desired()))
        if self.forced is not None:
            info["forced"] = sorted(self.forced)
        return info
