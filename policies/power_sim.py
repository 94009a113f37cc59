"""A simulated Jetson AGX Orin 64GB for development and tests.

Modes and GPU caps follow NVIDIA's nvpmodel power modes of the AGX Orin 64GB
(MAXN 1.3 GHz, 50W 816 MHz, 30W 612 MHz; 15W ≈ 420 MHz).
Throughputs come from the paper's measured training speed on Orin (OPT-1.3B, N=13: 0.33 /
0.92 / 1.41 samples/s at 30W / 50W / MAXN) times the per-sample cost implied by its FLOPs
figure (0.87 PFLOPs for 659 samples x 8 epochs ≈ 1.65e11 FLOPs/sample). 15W is extrapolated
from 30W by the GPU clock ratio. A mode switch is asynchronous like on the device: it shows up
after ``switch_delay_s``; modes listed in ``reboot_modes`` report ``needs_reboot``.
"""

from __future__ import annotations

import time

from policies.power import (
    ModeChange,
    ModeChangeStatus,
    PowerMode,
    PowerMonitor,
    PowerReading,
    register_power_monitor,
)

SAMPLE_FLOPS = 1.65e11  # per training sample, OPT-1.3B N=13 (see module docstring)
ORIN_MODES: tuple[PowerMode, ...] = (
    PowerMode(0, "MAXN", watts=60.0, gpu_max_mhz=1300.0, flops_per_s=1.41 * SAMPLE_FLOPS),
    PowerMode(1, "MODE_15W", watts=15.0, gpu_max_mhz=420.0,
              flops_per_s=0.33 * 420 / 612 * SAMPLE_FLOPS),
    PowerMode(2, "MODE_30W", watts=30.0, gpu_max_mhz=612.0, flops_per_s=0.33 * SAMPLE_FLOPS),
    PowerMode(3, "MODE_50W", watts=50.0, gpu_max_mhz=816.0, flops_per_s=0.92 * SAMPLE_FLOPS),
)


@register_power_monitor("sim-orin")
class SimulatedOrinMonitor(PowerMonitor):
    def __init__(
        self,
        initial_mode: str = "MODE_30W",
        switch_delay_s: float = 0.5,
        reboot_modes: tuple[str, ...] | list[str] = (),
        idle_fraction: float = 0.35,
        flops_scale: float = 1.0,
    ) -> None:
        """
        Args:
            initial_mode: mode at start.
            switch_delay_s: time until a requested mode shows up as current.
            reboot_modes: modes whose switch needs a reboot (reported, not applied).
            idle_fraction: power draw when not adapting, as a fraction of the mode's watts.
            flops_scale: scales every mode's throughput (tests use tiny models).
        """
        if flops_scale <= 0:
            raise ValueError(f"flops_scale must be > 0, got {flops_scale}")
        self._modes = [
            PowerMode(m.id, m.name, m.watts, m.gpu_max_mhz, (m.flops_per_s or 0) * flops_scale)
            for m in ORIN_MODES
        ]
        names = [m.name for m in self._modes]
        for name in [initial_mode, *reboot_modes]:
            if name not in names:
                raise ValueError(f"sim-orin: unknown mode {name!r}; modes: {names}")
        self._current = self.find_mode(initial_mode)
        self.switch_delay_s = switch_delay_s
        self.reboot_modes = frozenset(reboot_modes)
        self.idle_fraction = idle_fraction
        self._adapting = False
        self._pending: ModeChange | None = None
        self._pending_mode: PowerMode | None = None

    def modes(self) -> list[PowerMode]:
        return list(self._modes)

    def current_mode(self) -> PowerMode | None:
        return self._current

    def read(self) -> PowerReading:
        mode = self._current or self._modes[0]
        load = 1.0 if self._adapting else self.idle_fraction
        return PowerReading(
            timestamp=time.time(),
            watts=(mode.watts or 0.0) * load,
            gpu_mhz=mode.gpu_max_mhz * load if mode.gpu_max_mhz else None,
            mode=mode.name,
            source=self.name,
        )

    def note_activity(self, adapting: bool) -> None:
        self._adapting = adapting

    def request_mode(self, name: str) -> ModeChange:
        target = self.find_mode(name)
        if target is None:
            known = [m.name for m in self._modes]
            return ModeChange(name, ModeChangeStatus.FAILED, f"unknown mode; modes: {known}")
        if target.name in self.reboot_modes:
            return ModeChange(target.name, ModeChangeStatus.NEEDS_REBOOT,
                              f"{target.name} changes the TPC mask; reboot to apply")
        change = ModeChange(target.name, ModeChangeStatus.PENDING)
        self._pending, self._pending_mode = change, target
        if self.switch_delay_s <= 0:
            return self.poll_mode_change() or change
        return change

    def poll_mode_change(self) -> ModeChange | None:
        change = self._pending
        if change is None:
            return None
        if time.monotonic() - change.requested_at < self.switch_delay_s:
            return None
        self._current = self._pending_mode
        change.status = ModeChangeStatus.APPLIED
        self._pending = self._pending_mode = None
        return change
