"""Budget planner: how much adaptation fits in the current power mode.

The cost model is the mPnP-LLM paper's (arXiv 2312.07886; :mod:`mpnp.cost_model`): per
training sample the forward pass always runs through the whole LLM, the backward pass only
through the last ``N`` connected blocks plus the aligners and the multimodal embeddings::

    sample_flops(N) = forward + T_dw(aligners) + T_dy(emb) + (N / L) * T_dy(LLM)

The planner turns a power mode's budget (a FLOPs/s capacity, its watts and a deadline for the
whole adaptation run) into a choice of ``N`` and of the number of optimizer steps. It prefers
the paper's elastic knob: the largest ``N`` that still affords the target number of steps
inside the deadline; when even the smallest ``N`` cannot, it shortens the run; when not even
``min_steps`` fit, the plan is infeasible and adaptation waits for a better power mode.
:meth:`BudgetPlanner.plan_flops` is the same solve for a FLOPs budget of a run with a fixed
number of steps (``mpnp adapt --budget-tflops``). Every decision is kept in a bounded log
that the daemon shows in ``status``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass

from mpnp.cost_model import CostModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PowerBudget:
    """What a power mode allows for one adaptation run.

    Attributes:
        mode: power mode name (e.g. ``MODE_30W``).
        flops_per_s: sustained training throughput available in this mode.
        watts: the mode's power budget (reported; used for the energy estimate).
        deadline_s: wall-clock time allowed for the whole adaptation run.
    """

    mode: str
    flops_per_s: float
    watts: float
    deadline_s: float

    def __post_init__(self) -> None:
        if not self.mode:
            raise ValueError("PowerBudget.mode must be a non-empty name")
        for name in ("flops_per_s", "watts", "deadline_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"PowerBudget.{name} must be a finite number > 0, got {value}")


@dataclass(frozen=True)
class PlannerConfig:
    """How the planner trades ``N`` against steps.

    Attributes:
        batch_size: samples per optimizer step.
        target_steps: steps of a full adaptation run (e.g. epochs * samples / batch).
        min_steps: below this a run is not worth starting (plan is infeasible).
        n_min: smallest number of connected blocks allowed.
        n_max: largest (``None``: all ``L`` blocks).
        utilization: fraction of the capacity given to adaptation (the rest serves queries).
    """

    batch_size: int = 16
    target_steps: int = 300
    min_steps: int = 10
    n_min: int = 1
    n_max: int | None = None
    utilization: float = 0.8

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.min_steps < 1 or self.target_steps < self.min_steps:
            raise ValueError(
                f"need 1 <= min_steps <= target_steps, got {self.min_steps}, {self.target_steps}"
            )
        if self.n_min < 1:
            raise ValueError(f"n_min must be >= 1, got {self.n_min}")
        if self.n_max is not None and self.n_max < self.n_min:
            raise ValueError(f"n_max ({self.n_max}) must be >= n_min ({self.n_min})")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {self.utilization}")


@dataclass(frozen=True)
class BudgetPlan:
    """One planning decision (also what ``status`` shows)."""

    mode: str
    feasible: bool
    n_blocks: int
    steps: int
    batch_size: int
    step_flops: float
    total_flops: float
    est_seconds: float
    est_energy_j: float
    reason: str
    replan: bool = False
    at: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class BudgetPlanner:
    """Chooses ``N`` and the number of steps from a power budget and a cost model."""

    def __init__(self, config: PlannerConfig | None = None, history: int = 50) -> None:
        self.config = config or PlannerConfig()
        self.decisions: deque[BudgetPlan] = deque(maxlen=history)

    @property
    def last(self) -> BudgetPlan | None:
        return self.decisions[-1] if self.decisions else None

    def plan(self, budget: PowerBudget, cost: CostModel) -> BudgetPlan:
        """Plan a fresh run: the largest affordable ``N`` at the target number of steps."""
        cfg = self.config
        n_hi = min(cfg.n_max or cost.num_layers, cost.num_layers)
        n_lo = min(cfg.n_min, n_hi)
        capacity = budget.flops_per_s * cfg.utilization * budget.deadline_s  # FLOPs in deadline
        for n in range(n_hi, n_lo - 1, -1):
            if cost.step_flops(n, cfg.batch_size) * cfg.target_steps <= capacity:
                reason = f"largest N with {cfg.target_steps} steps inside {budget.deadline_s:g}s"
                return self._record(budget, cost, n, cfg.target_steps, True, reason)
        steps = int(capacity // cost.step_flops(n_lo, cfg.batch_size))
        if steps >= cfg.min_steps:
            reason = f"N={n_lo} (minimum) and only {steps} of {cfg.target_steps} steps fit"
            return self._record(budget, cost, n_lo, steps, True, reason)
        reason = (
            f"not even {cfg.min_steps} steps at N={n_lo} fit in {budget.deadline_s:g}s "
            f"at {budget.flops_per_s:.3g} FLOP/s; waiting for a larger power mode"
        )
        return self._record(budget, cost, n_lo, max(steps, 0), False, reason)

    def plan_flops(self, budget_flops: float, cost: CostModel, steps: int | None = None,
                   mode: str = "flops-budget") -> BudgetPlan:
        """The largest ``N`` whose ``steps`` (default: ``target_steps``) fit ``budget_flops``.

        The run is never shortened here (its length is the caller's epochs); when not even
        ``n_min`` fits, the plan is ``n_min`` and marked infeasible.
        """
        cfg = self.config
        steps = cfg.target_steps if steps is None else steps
        if steps < 1 or not budget_flops > 0:
            raise ValueError(f"need steps >= 1 and budget_flops > 0, got {steps}, {budget_flops}")
        n_hi = min(cfg.n_max or cost.num_layers, cost.num_layers)
        n_lo = min(cfg.n_min, n_hi)
        budget = PowerBudget(mode=mode, flops_per_s=budget_flops / cfg.utilization, watts=1.0,
                             deadline_s=1.0)  # capacity = budget_flops exactly
        for n in range(n_hi, n_lo - 1, -1):
            if cost.step_flops(n, cfg.batch_size) * steps <= budget_flops:
                reason = f"largest N whose {steps} steps fit {budget_flops:.3g} FLOPs"
                return self._record(budget, cost, n, steps, True, reason)
        reason = (f"{budget_flops:.3g} FLOPs do not fit {steps} steps even at N={n_lo} "
                  f"(needs {cost.step_flops(n_lo, cfg.batch_size) * steps:.3g})")
        return self._record(budget, cost, n_lo, steps, False, reason)

    def replan(
        self,
        budget: PowerBudget,
        cost: CostModel,
        n_blocks: int,
        steps_done: int,
        elapsed_s: float,
    ) -> BudgetPlan:
        """Re-plan a run in progress after the power mode changed.

        ``N`` stays fixed (changing the connected blocks would throw away the progress);
        the number of steps is what fits in the time left at the new capacity, capped by the
        target. A run that cannot make ``min_steps`` in total is still allowed to finish the
        steps it has done (``steps == steps_done`` stops it at once).
        """
        cfg = self.config
        remaining_s = max(budget.deadline_s - elapsed_s, 0.0)
        affordable = budget.flops_per_s * cfg.utilization * remaining_s
        more = int(affordable // cost.step_flops(n_blocks, cfg.batch_size))
        steps = min(cfg.target_steps, steps_done + more)
        reason = (
            f"power mode -> {budget.mode}: N kept at {n_blocks}, {more} more steps fit in "
            f"the {remaining_s:.0f}s left"
        )
        return self._record(budget, cost, n_blocks, steps, steps > steps_done, reason, True)

    def _record(
        self,
        budget: PowerBudget,
        cost: CostModel,
        n: int,
        steps: int,
        feasible: bool,
        reason: str,
        replan: bool = False,
    ) -> BudgetPlan:
        step_flops = cost.step_flops(n, self.config.batch_size)
        total = step_flops * steps
        seconds = total / (budget.flops_per_s * self.config.utilization)
        plan = BudgetPlan(
            mode=budget.mode,
            feasible=feasible,
            n_blocks=n,
            steps=steps,
            batch_size=self.config.batch_size,
            step_flops=step_flops,
            total_flops=total,
            est_seconds=seconds,
            est_energy_j=seconds * budget.watts,
            reason=reason,
            replan=replan,
            at=time.time(),
        )
        self.decisions.append(plan)
        log.info(
            "budget plan (%s): feasible=%s N=%d steps=%d est=%.1fs %.0fJ: %s",
            plan.mode, feasible, n, steps, seconds, plan.est_energy_j, reason,
        )
        return plan
