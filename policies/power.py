"""Power monitors: one interface over jtop (Jetson), NVML (desktop GPUs), the CPU, and a
simulated AGX Orin, with a registry and automatic selection.

A monitor reads power (watts), the GPU clock and the current power mode, lists the modes and
switches them. Switching can be asynchronous (jtop applies ``nvpmodel`` in its root service and
the new mode shows up later), so it is two-phase: :meth:`PowerMonitor.request_mode` starts a
change and returns a :class:`ModeChange` (possibly ``pending``), and
:meth:`PowerMonitor.poll_mode_change` reports the outcome (``applied``, ``needs_reboot``,
``timeout``, ``failed``) once. Each mode carries the training throughput it allows
(``flops_per_s``), which is what the budget planner consumes.
"""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum

from mpnp.registry import Registry
from policies.budget import PowerBudget

log = logging.getLogger(__name__)


class PowerMonitorUnavailable(RuntimeError):
    """The monitor cannot run here (no jtop service, no NVIDIA driver, ...)."""


@dataclass(frozen=True)
class PowerMode:
    """One power mode.

    Attributes:
        id: the mode's number (``nvpmodel -m ID``).
        name: e.g. ``MAXN``, ``MODE_30W``.
        watts: the mode's power budget (``None`` when uncapped / unknown).
        gpu_max_mhz: GPU clock cap in this mode, if known.
        flops_per_s: sustained training throughput in this mode, if known.
        tpc_mask: TPC power-gating mask (a differing mask needs a reboot to apply).
    """

    id: int
    name: str
    watts: float | None = None
    gpu_max_mhz: float | None = None
    flops_per_s: float | None = None
    tpc_mask: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PowerReading:
    timestamp: float
    watts: float | None
    gpu_mhz: float | None
    mode: str | None
    source: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class ModeChangeStatus(str, Enum):
    PENDING = "pending"
    APPLIED = "applied"
    NEEDS_REBOOT = "needs_reboot"
    TIMEOUT = "timeout"
    FAILED = "failed"
    UNSUPPORTED = "unsupported"


@dataclass
class ModeChange:
    target: str
    status: ModeChangeStatus
    message: str = ""
    requested_at: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.status is not ModeChangeStatus.PENDING

    def to_dict(self) -> dict:
        return {"target": self.target, "status": self.status.value, "message": self.message}


def watts_from_mode_name(name: str) -> float | None:
    """``MODE_30W`` -> 30.0; ``MAXN`` -> None."""
    match = re.search(r"(\d+(?:\.\d+)?)\s*W\b", name, flags=re.IGNORECASE)
    return float(match.group(1)) if match else None


_MODEL_RE = re.compile(r"POWER_MODEL:?\s+ID\s*=\s*(\d+)\s+NAME\s*=\s*([^\s>]+)")
_GPU_MAX_RE = re.compile(r"^\s*GPU\s*:?\s+MAX_FREQ\s*:?\s+(-?\d+)")
_TPC_RE = re.compile(r"TPC_PG_MASK\s*:?\s+(\d+)")


def parse_nvpmodel(text: str) -> list[PowerMode]:
    """Parse ``nvpmodel -p --verbose`` output (or ``/etc/nvpmodel.conf``) into modes.

    Recognizes ``POWER_MODEL: ID=<n> NAME=<name>`` (verbose) and
    ``< POWER_MODEL ID=<n> NAME=<name> >`` (conf) headers, then within each mode the
    ``GPU MAX_FREQ <Hz>`` line (``-1`` = uncapped) and the ``TPC_PG_MASK`` value. The
    ``NVPM VERB:`` prefixes of verbose output are ignored.
    """
    modes: list[dict] = []
    for raw in text.splitlines():
        line = raw.split("NVPM VERB:", 1)[-1].strip()
        match = _MODEL_RE.search(line)
        if match:
            modes.append({"id": int(match.group(1)), "name": match.group(2)})
            continue
        if not modes:
            continue
        gpu = _GPU_MAX_RE.match(line)
        if gpu and int(gpu.group(1)) > 0:
            modes[-1]["gpu_max_mhz"] = int(gpu.group(1)) / 1e6
        tpc = _TPC_RE.search(line)
        if tpc:
            modes[-1]["tpc_mask"] = int(tpc.group(1))
    return [
        PowerMode(
            id=m["id"],
            name=m["name"],
            watts=watts_from_mode_name(m["name"]),
            gpu_max_mhz=m.get("gpu_max_mhz"),
            tpc_mask=m.get("tpc_mask"),
        )
        for m in modes
    ]


class PowerMonitor(ABC):
    """Reads power and manages power modes on one kind of machine."""

    name: str = ""

    @classmethod
    def available(cls) -> bool:
        """Cheap probe used by automatic selection (construction may still fail)."""
        return True

    @abstractmethod
    def read(self) -> PowerReading: ...

    @abstractmethod
    def modes(self) -> list[PowerMode]: ...

    @abstractmethod
    def current_mode(self) -> PowerMode | None: ...

    def request_mode(self, name: str) -> ModeChange:
        return ModeChange(name, ModeChangeStatus.UNSUPPORTED, f"{self.name} cannot set modes")

    def poll_mode_change(self) -> ModeChange | None:
        """The outcome of a pending change, reported once; ``None`` otherwise."""
        return None

    def note_activity(self, adapting: bool) -> None:
        """Tell the monitor whether adaptation is running (used by the simulation)."""

    def close(self) -> None:
        """Release the monitor's resources."""

    def find_mode(self, name: str) -> PowerMode | None:
        for mode in self.modes():
            if mode.name == name or str(mode.id) == name:
                return mode
        return None

    def budget(self, deadline_s: float, default_flops_per_s: float | None = None) -> PowerBudget:
        """The planner's budget in the current mode."""
        mode = self.current_mode()
        if mode is None:
            raise RuntimeError(f"power monitor {self.name}: current power mode unknown")
        flops = mode.flops_per_s or default_flops_per_s
        if not flops:
            raise RuntimeError(
                f"power monitor {self.name}: no throughput known for mode {mode.name}; "
                "set power.flops_per_s in the daemon config"
            )
        watts = mode.watts or self.read().watts or 1.0
        return PowerBudget(mode=mode.name, flops_per_s=flops, watts=watts, deadline_s=deadline_s)


#: Order of automatic selection (the simulation is never chosen automatically).
AUTO_ORDER: tuple[str, ...] = ("jtop", "nvml", "cpu")
MONITORS: Registry[type[PowerMonitor]] = Registry(
    "power monitor", builtin_modules=("policies.power_sim", "policies.power_devices"))


def register_power_monitor(name: str) -> Callable[[type[PowerMonitor]], type[PowerMonitor]]:
    def wrap(cls: type[PowerMonitor]) -> type[PowerMonitor]:
        MONITORS.register(name, cls)
        cls.name = name
        return cls

    return wrap


def list_power_monitors() -> list[str]:
    return MONITORS.names()


def create_power_monitor(name: str = "auto", **options: object) -> PowerMonitor:
    """Build the named monitor, or for ``auto`` the first available in :data:`AUTO_ORDER`."""
    if name != "auto":
        return MONITORS.get(name)(**options)
    for candidate in AUTO_ORDER:
        cls = MONITORS.get(candidate)
        if not cls.available():
            continue
        try:
            monitor = cls(**options)
        except PowerMonitorUnavailable as exc:
            log.info("power monitor %s unavailable: %s", candidate, exc)
            continue
        log.info("power monitor: %s (auto)", candidate)
        return monitor
    raise PowerMonitorUnavailable(f"no power monitor available among {AUTO_ORDER}")
