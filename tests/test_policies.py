"""Context policies (hysteresis, dwell, override, registry), the budget planner and the power
monitors (simulated Orin, jtop with a fake client, nvpmodel parsing, CPU/RAPL)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from policies import (
    BudgetPlanner,
    ContextPolicy,
    ContextSample,
    CostModel,
    LightLevelPolicy,
    ModalitySelector,
    ModeChangeStatus,
    PlannerConfig,
    PowerBudget,
    create_policy,
    create_power_monitor,
    list_policies,
    list_power_monitors,
    parse_nvpmodel,
    register_policy,
    register_power_monitor,
)
from policies.power_devices import CpuMonitor, JtopMonitor
from scenes.sample import CAMERA_VIEWS


def _views(level: int) -> dict[str, np.ndarray]:
    return {v: np.full((16, 16, 3), level, np.uint8) for v in CAMERA_VIEWS}


def _drive(policy, lights, dt=1.0, start=0.0, header=True):
    out = []
    for i, light in enumerate(lights):
        t = start + i * dt
        sample = (ContextSample(t, _views(0), ambient_light=light) if header
                  else ContextSample(t, _views(int(light)), None))
        policy.observe(sample)
        out.append(policy.state)
    return out


def test_light_level_switches_after_dwell_not_before():
    policy = LightLevelPolicy(dwell_s=2.0)
    states = _drive(policy, [1.0, 0.1, 0.1, 0.1, 0.1])
    assert states == ["day", "day", "day", "night", "night"]
    assert policy.desired() == frozenset({"lidar"}) and policy.switches == 1


def test_light_level_hysteresis_ignores_flicker_in_the_gap():
    policy = LightLevelPolicy(dwell_s=0.0, night_below=0.25, day_above=0.35)
    states = _drive(policy, [0.2, 0.3, 0.34, 0.26, 0.3, 0.36])
    assert states == ["night", "night", "night", "night", "night", "day"]


def test_light_level_brief_dip_resets_the_dwell():
    policy = LightLevelPolicy(dwell_s=2.0)
    states = _drive(policy, [0.1, 0.1, 0.9, 0.1, 0.1, 0.1])
    assert states == ["day"] * 5 + ["night"]


def test_light_from_camera_luminance_when_no_header():
    policy = LightLevelPolicy(dwell_s=0.0, luminance_dark=0.2, luminance_bright=0.6)
    policy.observe(ContextSample(0.0, _views(153), None))  # luma 0.6 -> light 1.0
    assert policy.light == pytest.approx(1.0) and policy.light_source == "luminance"
    policy.observe(ContextSample(1.0, _views(51), None))  # luma 0.2 -> light 0.0
    assert policy.light == pytest.approx(0.0) and policy.state == "night"
    header_only = LightLevelPolicy(source="header")
    header_only.observe(ContextSample(0.0, _views(0), None))
    assert header_only.light is None and header_only.state == "day"


def test_policy_config_errors_name_the_field():
    with pytest.raises(ValueError, match="night_below < day_above"):
        LightLevelPolicy(night_below=0.5, day_above=0.4)
    with pytest.raises(ValueError, match="unknown modalities.*sonar"):
        LightLevelPolicy(night_modalities=("sonar",))
    with pytest.raises(ValueError, match="unknown context policy 'nope'"):
        create_policy("nope")


def test_policy_registry_rejects_duplicates_and_lists():
    assert {"light-level", "fixed"} <= set(list_policies())
    with pytest.raises(ValueError, match="already registered"):
        @register_policy("light-level")
        class Again(ContextPolicy):  # pragma: no cover - never instantiated
            def observe(self, sample): ...

            def desired(self): ...


def test_operator_override_wins_until_released():
    selector = ModalitySelector(LightLevelPolicy(dwell_s=0.0))
    selector.force(["camera", "lidar"])
    selector.observe(ContextSample(0.0, None, ambient_light=0.0))
    assert selector.mode == "forced" and selector.desired() == {"camera", "lidar"}
    assert selector.policy.state == "night"  # the policy keeps observing underneath
    selector.release()
    assert selector.mode == "auto" and selector.desired() == {"lidar"}


# --- budget planner ---------------------------------------------------------------------------

COST = CostModel(forward=1e9, dy_llm=3e9, dw_aligners=1e7, dy_emb=1e7, num_layers=30)


def _budget(flops, mode="MODE_30W", deadline=100.0):
    return PowerBudget(mode=mode, flops_per_s=flops, watts=30.0, deadline_s=deadline)


def test_cost_model_follows_the_paper_formula():
    assert COST.backward_flops(15) == pytest.approx(1e7 + 1e7 + 0.5 * 3e9)
    assert COST.sample_flops(0) == pytest.approx(1e9 + 2e7)
    with pytest.raises(ValueError, match="n_blocks must be in 0..30"):
        COST.sample_flops(31)


def test_one_cost_model_per_sample_and_per_batch():
    batch4 = CostModel(forward=4e9, dy_llm=12e9, dw_aligners=4e7, dy_emb=4e7, num_layers=30,
                       batch=4)
    assert batch4.sample_flops(15) == pytest.approx(COST.sample_flops(15))
    assert batch4.mpnp(15) == pytest.approx(COST.step_flops(15, 4))
    with pytest.raises(ValueError, match="batch"):
        CostModel(forward=1.0, dy_llm=1.0, dw_aligners=0.0, dy_emb=0.0, num_layers=2, batch=0)


def test_planner_solves_n_from_a_flops_budget():
    planner = BudgetPlanner(PlannerConfig(batch_size=2, target_steps=5, min_steps=1))
    plan = planner.plan_flops(COST.step_flops(10, 2) * 5 * 1.0001, COST)
    assert plan.feasible and plan.n_blocks == 10 and plan.steps == 5
    assert plan.total_flops == pytest.approx(COST.step_flops(10, 2) * 5)
    tiny = planner.plan_flops(1.0, COST, steps=5)
    assert not tiny.feasible and tiny.n_blocks == 1 and tiny.steps == 5


def test_planner_picks_the_largest_n_that_fits():
    planner = BudgetPlanner(PlannerConfig(batch_size=4, target_steps=10, min_steps=2))
    capacity_per_s = 4 * COST.sample_flops(12) * 10 / (0.8 * 100)  # exactly N = 12 fits
    plan = planner.plan(_budget(capacity_per_s * 1.0001), COST)
    assert plan.feasible and plan.n_blocks == 12 and plan.steps == 10
    assert plan.total_flops == pytest.approx(10 * 4 * COST.sample_flops(12))
    assert plan.est_energy_j == pytest.approx(plan.est_seconds * 30.0)
    big = planner.plan(_budget(1e15), COST)
    assert big.n_blocks == 30
    assert [d.n_blocks for d in planner.decisions] == [12, 30]


def test_planner_shortens_the_run_then_gives_up():
    planner = BudgetPlanner(PlannerConfig(batch_size=4, target_steps=10, min_steps=4, n_min=2))
    step = 4 * COST.sample_flops(2)
    short = planner.plan(_budget(step * 5 / 80 * 1.0001), COST)  # 5 steps at N=2
    assert short.feasible and short.n_blocks == 2 and short.steps == 5
    none = planner.plan(_budget(step * 3 / 80 * 1.0001), COST)
    assert not none.feasible and "waiting for a larger power mode" in none.reason


def test_replan_keeps_n_and_fits_the_time_left():
    planner = BudgetPlanner(PlannerConfig(batch_size=4, target_steps=100, min_steps=1))
    step = 4 * COST.sample_flops(10)
    plan = planner.replan(_budget(step / 0.8, "MODE_15W"), COST, 10, steps_done=20,
                          elapsed_s=60.0)
    assert plan.replan and plan.n_blocks == 10 and plan.steps == 20 + 40 and plan.feasible
    stop = planner.replan(_budget(step / 0.8, "MODE_15W"), COST, 10, 20, elapsed_s=100.0)
    assert stop.steps == 20 and not stop.feasible


# --- power monitors ---------------------------------------------------------------------------

NVPMODEL_VERBOSE = """
NVPM VERB: Config file: /etc/nvpmodel.conf
NVPM VERB: POWER_MODEL: ID=0 NAME=MAXN
NVPM VERB: GPU MAX_FREQ 1300500000
NVPM VERB: TPC_PG_MASK 0
NVPM VERB: POWER_MODEL: ID=1 NAME=MODE_15W
NVPM VERB: GPU MAX_FREQ 420750000
NVPM VERB: TPC_PG_MASK 1
NVPM VERB: POWER_MODEL: ID=2 NAME=MODE_30W
NVPM VERB: GPU MAX_FREQ 612000000
NVPM VERB: TPC_PG_MASK 0
NVPM VERB: POWER_MODEL: ID=3 NAME=MODE_50W
NVPM VERB: GPU MAX_FREQ 816000000
NVPM VERB: TPC_PG_MASK 0
"""


def test_parse_nvpmodel_verbose():
    modes = parse_nvpmodel(NVPMODEL_VERBOSE)
    assert [(m.id, m.name) for m in modes] == [(0, "MAXN"), (1, "MODE_15W"), (2, "MODE_30W"),
                                               (3, "MODE_50W")]
    assert modes[2].gpu_max_mhz == pytest.approx(612.0) and modes[2].watts == 30.0
    assert modes[0].watts is None and modes[1].tpc_mask == 1


def test_sim_orin_switches_asynchronously_and_scales_throughput():
    monitor = create_power_monitor("sim-orin", switch_delay_s=0.05, reboot_modes=["MAXN"])
    assert monitor.current_mode().name == "MODE_30W"
    flops = {m.name: m.flops_per_s for m in monitor.modes()}
    assert flops["MODE_15W"] < flops["MODE_30W"] < flops["MODE_50W"] < flops["MAXN"]
    change = monitor.request_mode("MODE_50W")
    assert change.status is ModeChangeStatus.PENDING and monitor.poll_mode_change() is None
    time.sleep(0.06)
    assert monitor.poll_mode_change().status is ModeChangeStatus.APPLIED
    assert monitor.current_mode().name == "MODE_50W" and monitor.poll_mode_change() is None
    assert monitor.request_mode("MAXN").status is ModeChangeStatus.NEEDS_REBOOT
    assert monitor.request_mode("MODE_9W").status is ModeChangeStatus.FAILED
    idle = monitor.read().watts
    monitor.note_activity(True)
    assert monitor.read().watts == 50.0 > idle
    assert monitor.budget(60.0).flops_per_s == flops["MODE_50W"]


class FakeJtop:
    """The parts of ``jtop.jtop`` the monitor uses; nvpmodel applies after ``delay`` polls."""

    def __init__(self, delay: int = 2, reject: set[str] = frozenset()):
        names = ["MAXN", "MODE_15W", "MODE_30W", "MODE_50W"]
        self.nvp = SimpleNamespace(models=names, name="MODE_30W", id=2, status=[True] * 4)
        self.delay, self.reject, self._target, self._polls = delay, reject, None, 0
        self.power = {"tot": {"power": 23456}, "rail": {"VDD_GPU_SOC": {"power": 9000}}}
        self.gpu = {"gpu": {"freq": {"cur": 612000}}}

    @property
    def nvpmodel(self):
        if self._target is not None:
            self._polls += 1
            if self._polls >= self.delay:
                if self._target in self.reject:
                    self.nvp.status[self.nvp.models.index(self._target)] = False
                else:
                    self.nvp.name = self._target
                    self.nvp.id = self.nvp.models.index(self._target)
                self._target = None
        return self.nvp

    @nvpmodel.setter
    def nvpmodel(self, name):
        self._target, self._polls = name, 0


def test_jtop_monitor_reads_watts_and_confirms_a_mode_change():
    fake = FakeJtop(delay=3)
    monitor = JtopMonitor(client=fake, flops_per_s=1e12, reference_mhz=1300.0,
                          nvpmodel_modes=parse_nvpmodel(NVPMODEL_VERBOSE))
    reading = monitor.read()
    assert reading.watts == pytest.approx(23.456) and reading.gpu_mhz == pytest.approx(612.0)
    assert reading.extra["rails_w"]["VDD_GPU_SOC"] == pytest.approx(9.0)
    assert monitor.current_mode().name == "MODE_30W"
    assert monitor.current_mode().flops_per_s == pytest.approx(1e12 * 612 / 1300.5, rel=1e-3)
    change = monitor.request_mode("MODE_50W")
    assert change.status is ModeChangeStatus.PENDING
    outcomes = [monitor.poll_mode_change() for _ in range(4)]
    done = [o for o in outcomes if o is not None]
    assert len(done) == 1 and done[0].status is ModeChangeStatus.APPLIED
    assert monitor.current_mode().name == "MODE_50W"


def test_jtop_mode_with_other_tpc_mask_needs_a_reboot():
    monitor = JtopMonitor(client=FakeJtop(), nvpmodel_modes=parse_nvpmodel(NVPMODEL_VERBOSE))
    change = monitor.request_mode("MODE_15W")  # TPC mask 1 vs 0
    assert change.status is ModeChangeStatus.NEEDS_REBOOT and "reboot" in change.message


def test_jtop_rejected_change_times_out_as_needs_reboot():
    monitor = JtopMonitor(client=FakeJtop(delay=1, reject={"MAXN"}), confirm_timeout_s=0.0,
                          nvpmodel_modes=parse_nvpmodel(NVPMODEL_VERBOSE))
    assert monitor.request_mode("MAXN").status is ModeChangeStatus.PENDING
    time.sleep(0.01)
    change = monitor.poll_mode_change()
    assert change.status is ModeChangeStatus.NEEDS_REBOOT


def test_cpu_monitor_reads_rapl_energy(tmp_path):
    domain = tmp_path / "intel-rapl:0"
    domain.mkdir()
    energy = domain / "energy_uj"
    energy.write_text("1000000")
    monitor = CpuMonitor(flops_per_s=1e10, watts=15.0, rapl_root=str(tmp_path))
    assert monitor.read().watts is None  # the first reading has no interval
    time.sleep(0.05)
    energy.write_text("2000000")  # +1 J
    reading = monitor.read()
    assert reading.source == "cpu+rapl" and 0 < reading.watts < 1 / 0.05 * 1.01
    assert "cpu_percent" in reading.extra


def test_auto_selection_falls_back_to_the_cpu_here():
    assert {"jtop", "nvml", "cpu", "sim-orin"} <= set(list_power_monitors())
    monitor = create_power_monitor("auto")
    assert monitor.name in ("jtop", "nvml", "cpu")  # never the simulation
    with pytest.raises(ValueError, match="unknown power monitor"):
        create_power_monitor("sim-xavier")
    with pytest.raises(ValueError, match="already registered"):
        register_power_monitor("cpu")(CpuMonitor)
