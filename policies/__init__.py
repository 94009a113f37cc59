"""Context policies, the adaptation budget planner and power monitors (importable without torch)."""

from policies.budget import BudgetPlan, BudgetPlanner, CostModel, PlannerConfig, PowerBudget
from policies.context import (
    ContextPolicy,
    ContextSample,
    LightLevelConfig,
    LightLevelPolicy,
    ModalitySelector,
    create_policy,
    list_policies,
    modality_set,
    register_policy,
)
from policies.power import (
    ModeChange,
    ModeChangeStatus,
    PowerMode,
    PowerMonitor,
    PowerMonitorUnavailable,
    PowerReading,
    create_power_monitor,
    list_power_monitors,
    parse_nvpmodel,
    register_power_monitor,
)

__all__ = [
    "BudgetPlan", "BudgetPlanner", "CostModel", "PlannerConfig", "PowerBudget",
    "ContextPolicy", "ContextSample", "LightLevelConfig", "LightLevelPolicy", "ModalitySelector",
    "create_policy", "list_policies", "modality_set", "register_policy",
    "ModeChange", "ModeChangeStatus", "PowerMode", "PowerMonitor", "PowerMonitorUnavailable",
    "PowerReading", "create_power_monitor", "list_power_monitors", "parse_nvpmodel",
    "register_power_monitor",
]
