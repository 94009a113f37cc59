"""Adaptation runs: plan within the power budget, step, validate, then swap or discard.

Used by the engine only (same thread). A run is Algorithm 1's Adapt for one modality set:
the planner picks ``N`` and the steps from the current power mode, the backend trains its
candidate one bounded step at a time between queries, and at the end the candidate replaces
the serving state only if it validates better (or the operator forces it). A committed state
is saved to the store at once, so a restart resumes with it.

A *composition* run (:meth:`AdaptationController.start_compose`) is the same kind of run with
no training: the backend composes stored single-modality states into the candidate at once
(zero training FLOPs), then the run validates it in bounded steps and goes through the very
same gate (:meth:`AdaptationController.finish`). It publishes ``compose.*`` events instead of
``adaptation.*`` ones.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.backend import AdaptProgress, ComposeInput, ModelBackend
from daemon.protocol import EventType
from daemon.store import ModelStore, StoreError
from policies.budget import BudgetPlan, BudgetPlanner, PowerBudget

log = logging.getLogger(__name__)

Publish = Callable[[EventType, dict[str, Any]], None]


@dataclass
class AdaptationRun:
    modalities: frozenset[str]
    plan: BudgetPlan
    reason: str  # "policy" or "operator"
    force_commit: bool = False
    steps_done: int = 0
    phase: str = "train"
    started_at: float = field(default_factory=time.monotonic)
    last: AdaptProgress | None = None
    kind: str = "adapt"  # or "compose"
    #: compose runs: provenance (inputs, method, λ, compose_s) and whether to fine-tune after
    composition: dict[str, Any] | None = None
    finetune: bool = False
    #: adapt runs that fine-tune a composed serving state: that state's store generation
    finetune_of: int | None = None

    @property
    def steps_planned(self) -> int:
        return self.plan.steps

    def describe(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.kind == "compose":
            extra = {"composition": self.composition, "finetune": self.finetune}
        elif self.finetune_of is not None:
            extra = {"finetune_of": self.finetune_of}
        return {
            "kind": self.kind,
            **extra,
            "modalities": sorted(self.modalities),
            "reason": self.reason,
            "n_blocks": self.plan.n_blocks,
            "phase": self.phase,
            "steps_done": self.steps_done,
            "steps_planned": self.steps_planned,
            "progress": self.steps_done / max(self.steps_planned, 1),
            "loss": self.last.loss if self.last else None,
            "elapsed_s": time.monotonic() - self.started_at,
            "force_commit": self.force_commit,
        }


class AdaptationController:
    """Owns the current run (at most one) and the decisions around it."""

    def __init__(
        self,
        backend: ModelBackend,
        store: ModelStore,
        planner: BudgetPlanner,
        publish: Publish,
        progress_every: int = 10,
    ) -> None:
        self.backend = backend
        self.store = store
        self.planner = planner
        self.publish = publish
        self.progress_every = progress_every
        self.run: AdaptationRun | None = None
        self.last_result: dict[str, Any] | None = None
        self.last_composition: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.run is not None

    def start(
        self, modalities: frozenset[str], budget: PowerBudget, reason: str,
        force_commit: bool = False, finetune_of: int | None = None,
    ) -> BudgetPlan:
        """Plan and, when feasible, start a run (the caller checks ``plan.feasible``)."""
        if self.run is not None:
            raise RuntimeError("an adaptation run is already active")
        plan = self.planner.plan(budget, self.backend.cost_model())
        self.publish(EventType.BUDGET_PLAN, {"plan": plan.to_dict(), "for": sorted(modalities)})
        if not plan.feasible:
            return plan
        try:
            self.backend.start_adaptation(modalities, plan.n_blocks, plan.steps,
                                          plan.batch_size)
        except Exception as exc:  # e.g. a corrupt encoder in the store: keep serving
            log.error("cannot start adapting %s: %s", sorted(modalities), exc)
            failed = dataclasses.replace(plan, feasible=False, reason=f"cannot start: {exc}")
            self.last_result = {"modalities": sorted(modalities), "reason": reason,
                                "committed": False, "outcome": "failed", "error": str(exc)}
            self.publish(EventType.ADAPTATION_RESULT, self.last_result)
            return failed
        self.run = AdaptationRun(modalities, plan, reason, force_commit,
                                 finetune_of=finetune_of)
        self.publish(EventType.ADAPTATION_STARTED, self.run.describe())
        log.info("adaptation started for %s (%s): N=%d, %d steps", sorted(modalities), reason,
                 plan.n_blocks, plan.steps)
        return plan

    def start_compose(
        self, modalities: frozenset[str], inputs: list[ComposeInput], method: str,
        max_evals: int, reason: str, force_commit: bool = False, finetune: bool = False,
    ) -> AdaptationRun:
        """Compose ``inputs`` into the backend's candidate and start validating it.

        The composition itself (and DAMC's λ search) happens inside this call; the wall
        time of the call is recorded as ``compose_wall_s`` beside the backend's own
        ``compose_s``. On failure ``compose.finished`` (outcome ``failed``) is published,
        :attr:`last_composition` records it and the exception propagates: the serving state
        is untouched.
        """
        if self.run is not None:
            raise RuntimeError("an adaptation run is already active")
        head = {"kind": "compose", "modalities": sorted(modalities), "reason": reason,
                "method": method, "inputs": [i.to_dict() for i in inputs],
                "finetune": finetune}
        self.publish(EventType.COMPOSE_STARTED, head)
        started = time.monotonic()
        try:
            composition = dict(self.backend.compose_candidate(  # type: ignore[attr-defined]
                inputs, modalities, method, max_evals))
        except Exception as exc:
            log.error("cannot compose %s from %s: %s", sorted(modalities),
                      [i.name for i in inputs], exc)
            try:
                self.backend.discard_adapted()
            except Exception:  # nothing may have been built; keep serving either way
                log.exception("discard after a failed composition failed")
            self.last_composition = {**head, "committed": False, "outcome": "failed",
                                     "error": f"{type(exc).__name__}: {exc}"}
            self.publish(EventType.COMPOSE_FINISHED, self.last_composition)
            raise
        composition.update(requested_method=method, inputs=head["inputs"],
                           compose_wall_s=time.monotonic() - started, training_flops=0)
        n_blocks = int(composition.get("num_blocks") or 0)
        plan = BudgetPlan(mode="composition", feasible=True, n_blocks=n_blocks, steps=0,
                          batch_size=0, step_flops=0.0, total_flops=0.0, est_seconds=0.0,
                          est_energy_j=0.0, reason="training-free composition",
                          at=time.time())
        self.run = AdaptationRun(modalities, plan, reason, force_commit, started_at=started,
                                 kind="compose", composition=composition, finetune=finetune)
        log.info("composed %s from %s by %s in %.3f s; validating", sorted(modalities),
                 [i.name for i in inputs], composition.get("method"),
                 composition["compose_wall_s"])
        return self.run

    def replan(self, budget: PowerBudget) -> BudgetPlan | None:
        """The power mode changed mid-run: fit the remaining steps to the new budget."""
        run = self.run
        if run is None or run.kind == "compose":
            return None
        plan = self.planner.replan(
            budget, self.backend.cost_model(), run.plan.n_blocks, run.steps_done,
            time.monotonic() - run.started_at,
        )
        run.plan = plan
        self.backend.set_total_steps(max(plan.steps, run.steps_done))
        self.publish(EventType.BUDGET_PLAN, {"plan": plan.to_dict(), "for": sorted(run.modalities)})
        return plan

    def step(self) -> dict[str, Any] | None:
        """One bounded backend step; returns the run's result when the run ended.

        The backend counts optimizer steps (``progress.step``); a call may be a micro-step
        of one optimizer step or a validation chunk, so the count does not move every call.
        """
        run = self.run
        if run is None:
            return None
        try:
            progress = self.backend.adaptation_step()
        except Exception as exc:
            log.exception("adaptation step failed")
            return self._end(committed=False, outcome="failed", error=str(exc))
        if progress is None:
            return self.finish()
        advanced = progress.step != run.steps_done or progress.phase != run.phase
        run.steps_done = progress.step
        run.phase = progress.phase
        run.last = progress
        if run.kind == "adapt" and advanced and (
                run.steps_done % self.progress_every == 0
                or run.steps_done == run.steps_planned or progress.phase != "train"):
            self.publish(EventType.ADAPTATION_PROGRESS, run.describe())
        return None

    def finish(self, force: bool = False) -> dict[str, Any]:
        """Validate the candidate and swap it in if it beats the serving state (or forced)."""
        run = self.run
        if run is None:
            raise RuntimeError("no adaptation run to finish")
        try:
            adapted = float(self.backend.validation_accuracy("adapted"))
            serving = float(self.backend.validation_accuracy("serving"))
        except Exception as exc:
            log.exception("validation failed")
            return self._end(committed=False, outcome="failed", error=f"validation: {exc}")
        forced = force or run.force_commit
        if forced or adapted > serving:
            try:
                self.backend.commit_adapted()
            except Exception as exc:
                log.exception("commit failed")
                return self._end(False, "failed", error=f"commit: {exc}")
            return self._end(True, "forced" if forced and adapted <= serving else "better",
                             adapted=adapted, serving=serving)
        self.backend.discard_adapted()
        return self._end(False, "not_better", adapted=adapted, serving=serving)

    def cancel(self, why: str) -> dict[str, Any] | None:
        if self.run is None:
            return None
        self.backend.discard_adapted()
        return self._end(False, "cancelled", error=why)

    def save_serving(self, modalities: frozenset[str], meta: dict[str, Any]) -> int | None:
        """Save the serving state as a new store generation; ``None`` if saving failed."""
        try:
            entry = self.store.save_state(
                self.backend.save_state, {"modalities": sorted(modalities), **meta}
            )
        except (StoreError, OSError, RuntimeError, ValueError) as exc:
            log.error("could not save the adapted state: %s", exc)
            return None
        return entry.generation

    def _end(
        self, committed: bool, outcome: str, adapted: float | None = None,
        serving: float | None = None, error: str | None = None,
    ) -> dict[str, Any]:
        run = self.run
        if run is None:
            raise RuntimeError("no adaptation run to end")
        if not committed and outcome in ("failed",):
            try:
                self.backend.discard_adapted()
            except Exception:  # the run failed already; keep serving
                log.exception("discard after failure failed")
        self.run = None
        result = {
            **run.describe(),
            "committed": committed,
            "outcome": outcome,
            "adapted_accuracy": adapted,
            "serving_accuracy": serving,
            "error": error,
        }
        if run.kind == "compose":
            # From the start of the composition to the gate's decision (validation included).
            result["time_to_decision_s"] = time.monotonic() - run.started_at
            self.last_composition = result
            self.publish(EventType.COMPOSE_FINISHED, result)
        else:
            self.last_result = result
            self.publish(EventType.ADAPTATION_RESULT, result)
        log.info("%s for %s ended: %s (candidate %s vs serving %s)",
                 "composition" if run.kind == "compose" else "adaptation",
                 sorted(run.modalities), outcome, adapted, serving)
        return result
