"""Power monitors for real machines: jtop (Jetson), NVML (desktop GPUs), CPU (psutil + RAPL).

Every optional dependency is imported lazily inside the monitor, so this module imports
anywhere; a monitor that cannot run raises :class:`PowerMonitorUnavailable`.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import shutil
import subprocess
import time

from policies.power import (
    ModeChange,
    ModeChangeStatus,
    PowerMode,
    PowerMonitor,
    PowerMonitorUnavailable,
    PowerReading,
    parse_nvpmodel,
    register_power_monitor,
    watts_from_mode_name,
)

log = logging.getLogger(__name__)

JTOP_SOCKET = "/run/jtop.sock"


def _scaled_flops(mode_mhz: float | None, ref_flops: float | None, ref_mhz: float | None):
    """Throughput of a mode from a reference measurement, scaled by the GPU clock cap."""
    if not ref_flops:
        return None
    if mode_mhz and ref_mhz:
        return ref_flops * mode_mhz / ref_mhz
    return ref_flops


def read_nvpmodel_modes() -> list[PowerMode]:
    """Run ``nvpmodel -p --verbose`` and parse it (empty when the tool is absent)."""
    tool = shutil.which("nvpmodel")
    if tool is None:
        return []
    try:
        out = subprocess.run(
            [tool, "-p", "--verbose"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvpmodel -p --verbose failed: %s", exc)
        return []
    return parse_nvpmodel(out.stdout + out.stderr)


@register_power_monitor("jtop")
class JtopMonitor(PowerMonitor):
    """Jetson through jtop (jetson-stats): power in mW, GPU clock in kHz, nvpmodel.

    Args:
        client: an already started jtop-like object (tests); by default ``jtop.jtop()``.
        flops_per_s / reference_mhz: a measured training throughput at a GPU clock; each
            mode's throughput is scaled by its GPU cap (from ``nvpmodel -p --verbose``).
        confirm_timeout_s: how long to poll ``nvpmodel.id`` for an asynchronous change.
        nvpmodel_modes: parsed modes (tests); by default read from ``nvpmodel``.
    """

    def __init__(
        self,
        client: object | None = None,
        flops_per_s: float | None = None,
        reference_mhz: float | None = 1300.0,
        confirm_timeout_s: float = 20.0,
        nvpmodel_modes: list[PowerMode] | None = None,
    ) -> None:
        if client is None:
            try:
                from jtop import JtopException, jtop  # lazy: only on a Jetson
            except ImportError as exc:
                raise PowerMonitorUnavailable("jetson-stats (jtop) is not installed") from exc
            try:
                client = jtop()
                client.start()
            except JtopException as exc:
                raise PowerMonitorUnavailable(f"jtop service unreachable: {exc}") from exc
        self._jtop = client
        self.confirm_timeout_s = confirm_timeout_s
        parsed = nvpmodel_modes if nvpmodel_modes is not None else read_nvpmodel_modes()
        by_name = {m.name: m for m in parsed}
        names = list(self._jtop.nvpmodel.models)
        self._modes = []
        for index, name in enumerate(names):
            conf = by_name.get(name)
            mhz = conf.gpu_max_mhz if conf else None
            self._modes.append(
                PowerMode(
                    id=conf.id if conf else index,
                    name=name,
                    watts=watts_from_mode_name(name),
                    gpu_max_mhz=mhz,
                    flops_per_s=_scaled_flops(mhz, flops_per_s, reference_mhz),
                    tpc_mask=conf.tpc_mask if conf else None,
                )
            )
        self._pending: tuple[ModeChange, PowerMode] | None = None

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("jtop") is not None and os.path.exists(JTOP_SOCKET)

    def modes(self) -> list[PowerMode]:
        return list(self._modes)

    def current_mode(self) -> PowerMode | None:
        name = str(self._jtop.nvpmodel.name)
        return self.find_mode(name)

    def _gpu_mhz(self) -> float | None:
        for gpu in dict(self._jtop.gpu).values():
            freq = gpu.get("freq", {}) if isinstance(gpu, dict) else {}
            if "cur" in freq:
                return float(freq["cur"]) / 1000.0  # kHz -> MHz
        return None

    def read(self) -> PowerReading:
        power = self._jtop.power
        total = power.get("tot", {}).get("power")
        rails = {k: v.get("power", 0) / 1000.0 for k, v in power.get("rail", {}).items()}
        return PowerReading(
            timestamp=time.time(),
            watts=float(total) / 1000.0 if total is not None else None,  # mW -> W
            gpu_mhz=self._gpu_mhz(),
            mode=str(self._jtop.nvpmodel.name),
            source=self.name,
            extra={"rails_w": rails},
        )

    def request_mode(self, name: str) -> ModeChange:
        target = self.find_mode(name)
        if target is None:
            known = [m.name for m in self._modes]
            return ModeChange(name, ModeChangeStatus.FAILED, f"unknown mode; modes: {known}")
        current = self.current_mode()
        if (
            current is not None
            and target.tpc_mask is not None
            and current.tpc_mask is not None
            and target.tpc_mask != current.tpc_mask
        ):
            return ModeChange(target.name, ModeChangeStatus.NEEDS_REBOOT,
                              "the mode changes the TPC mask; nvpmodel applies it after a reboot")
        try:
            self._jtop.nvpmodel = target.name  # asynchronous: the root service applies it
        except Exception as exc:  # jtop raises JtopException (not importable here)
            return ModeChange(target.name, ModeChangeStatus.FAILED, str(exc))
        change = ModeChange(target.name, ModeChangeStatus.PENDING)
        self._pending = (change, target)
        return change

    def poll_mode_change(self) -> ModeChange | None:
        if self._pending is None:
            return None
        change, target = self._pending
        nvp = self._jtop.nvpmodel
        if int(nvp.id) == target.id or str(nvp.name) == target.name:
            change.status = ModeChangeStatus.APPLIED
        elif time.monotonic() - change.requested_at > self.confirm_timeout_s:
            statuses = list(getattr(nvp, "status", []) or [])
            index = [m.name for m in self._modes].index(target.name)
            rejected = index < len(statuses) and statuses[index] is False
            change.status = (
                ModeChangeStatus.NEEDS_REBOOT if rejected else ModeChangeStatus.TIMEOUT
            )
            change.message = (
                "jtop marks the mode as not applied; it needs a reboot" if rejected
                else f"mode not confirmed within {self.confirm_timeout_s:g}s"
            )
        else:
            return None
        self._pending = None
        return change

    def close(self) -> None:
        close = getattr(self._jtop, "close", None)
        if close is not None:
            close()


@register_power_monitor("nvml")
class NvmlMonitor(PowerMonitor):
    """Desktop NVIDIA GPU through NVML (``pynvml`` from nvidia-ml-py); one fixed mode."""

    def __init__(self, device_index: int = 0, flops_per_s: float | None = None) -> None:
        try:
            import pynvml  # lazy
        except ImportError as exc:
            raise PowerMonitorUnavailable("nvidia-ml-py (pynvml) is not installed") from exc
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            limit_mw = pynvml.nvmlDeviceGetEnforcedPowerLimit(self._handle)
            max_mhz = pynvml.nvmlDeviceGetMaxClockInfo(self._handle, pynvml.NVML_CLOCK_GRAPHICS)
        except pynvml.NVMLError as exc:
            raise PowerMonitorUnavailable(f"NVML: {exc}") from exc
        self._nvml = pynvml
        self._mode = PowerMode(0, "default", watts=limit_mw / 1000.0,
                               gpu_max_mhz=float(max_mhz), flops_per_s=flops_per_s)

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("pynvml") is not None

    def modes(self) -> list[PowerMode]:
        return [self._mode]

    def current_mode(self) -> PowerMode | None:
        return self._mode

    def read(self) -> PowerReading:
        nv = self._nvml
        return PowerReading(
            timestamp=time.time(),
            watts=nv.nvmlDeviceGetPowerUsage(self._handle) / 1000.0,  # mW -> W
            gpu_mhz=float(nv.nvmlDeviceGetClockInfo(self._handle, nv.NVML_CLOCK_GRAPHICS)),
            mode=self._mode.name,
            source=self.name,
        )

    def close(self) -> None:
        self._nvml.nvmlShutdown()


@register_power_monitor("cpu")
class CpuMonitor(PowerMonitor):
    """CPU machine: load from psutil, package power from RAPL where readable; one mode."""

    def __init__(
        self,
        flops_per_s: float | None = None,
        watts: float | None = None,
        rapl_root: str = "/sys/class/powercap",
    ) -> None:
        import psutil  # lazy (cheap, but keeps the module importable without it)

        self._psutil = psutil
        self._rapl_files = [
            path for path in sorted(glob.glob(os.path.join(rapl_root, "intel-rapl:*", "energy_uj")))
            if os.path.basename(os.path.dirname(path)).count(":") == 1 and os.access(path, os.R_OK)
        ]
        self._last_energy: tuple[float, float] | None = None
        self._mode = PowerMode(0, "default", watts=watts, flops_per_s=flops_per_s)
        psutil.cpu_percent(interval=None)  # prime the counter

    def _energy_j(self) -> float | None:
        total = 0.0
        try:
            for path in self._rapl_files:
                with open(path) as fh:
                    total += int(fh.read().strip()) / 1e6
        except (OSError, ValueError):
            return None
        return total if self._rapl_files else None

    def modes(self) -> list[PowerMode]:
        return [self._mode]

    def current_mode(self) -> PowerMode | None:
        return self._mode

    def read(self) -> PowerReading:
        now = time.monotonic()
        energy = self._energy_j()
        watts = None
        if energy is not None and self._last_energy is not None:
            t0, e0 = self._last_energy
            if now > t0 and energy >= e0:  # the counter wraps; skip that reading
                watts = (energy - e0) / (now - t0)
        if energy is not None:
            self._last_energy = (now, energy)
        freq = self._psutil.cpu_freq()
        return PowerReading(
            timestamp=time.time(),
            watts=watts,
            gpu_mhz=None,
            mode=self._mode.name,
            source="cpu+rapl" if self._rapl_files else "cpu",
            extra={"cpu_percent": self._psutil.cpu_percent(interval=None),
                   "cpu_mhz": freq.current if freq else None},
        )
