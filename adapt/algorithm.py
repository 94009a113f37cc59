"""Algorithm 1 at runtime: Select → Reconnect → Adapt, with N from the caller or a budget.

From the offline state (camera, trained on day data) a context change selects a new
modality set — **switch** (serving → new, e.g. C → L or C → R) or **add** (serving + new,
e.g. C → C+L) — connects it on a *fork* of the serving connector (the serving one keeps
answering, untouched), and adapts the fork on the training data the caller gives (the
context's: which context is the context policy's word, not the modalities'). ``N`` is
either given or solved from a FLOPs budget for the whole run through the analytic cost
model (:mod:`mpnp.cost_model`), which is conservative for mPnP here: the trainer's
lower-block replay makes the measured cost lower than the model's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from adapt.connectors.base import Connector
from adapt.connectors.mpnp import MPnPConnector
from adapt.engine import prepare_candidate
from adapt.features import FeatureSet
from adapt.trainer import TrainConfig, Trainer, TrainReport
from aligners.config import ConnectionConfig, ModalitySpec
from mpnp.cost_model import adaptation_cost
from mpnp.generation import encode_training
from policies.budget import BudgetPlanner, PlannerConfig

log = logging.getLogger(__name__)

#: Runtime modes: ``switch`` connects the new modalities instead of the serving ones,
#: ``add`` connects them next to the serving ones.
MODES: tuple[str, ...] = ("switch", "add")
#: The new modalities when a caller names none (the paper's night scenario: LiDAR).
DEFAULT_NEW: tuple[str, ...] = ("lidar",)


@dataclass
class BudgetDecision:
    """How N was chosen (kept for logs and reports)."""

    num_blocks: int
    budget_flops: float | None
    steps: int
    step_flops: float  # analytic, at the chosen N
    full_step_flops: float  # analytic, full fine-tuning


def select_modalities(mode: str, specs: dict[str, ModalitySpec],
                      new: Sequence[str] = DEFAULT_NEW,
                      serving: Sequence[str] = ("camera",)) -> list[ModalitySpec]:
    """Select: ``new`` (``switch``) or ``serving`` + ``new`` (``add``), as specs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    names = list(dict.fromkeys(new if mode == "switch" else [*serving, *new]))
    if not names:
        raise ValueError(f"mode {mode!r} selects no modality (new={list(new)})")
    missing = [m for m in names if m not in specs]
    if missing:
        raise ValueError(f"mode {mode!r} needs modalities {missing}; have {sorted(specs)}")
    return [specs[m] for m in names]


def mean_text_tokens(tokenizer, data: FeatureSet, sample: int = 64,
                     batch_size: int | None = None) -> int:
    """Tokens per sequence (prompt + answer) that a training step pays for.

    With ``batch_size`` it is the mean *padded* width of batches of that size — what the
    steps really compute, so a budget planned with it is not overrun by padding.
    """
    items = data.items[:sample]
    size = batch_size or len(items)
    widths = []
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        pb = encode_training(tokenizer, [i.question for i in chunk], [i.answer for i in chunk])
        widths.append(pb.input_ids.shape[1] if batch_size else
                      float(pb.attention_mask.sum(1).float().mean()))
    return max(1, round(sum(widths) / len(widths)))


def plan_num_blocks(llm, tokenizer, modalities: Sequence[ModalitySpec], data: FeatureSet,
                    train: TrainConfig, budget_flops: float,
                    connection: ConnectionConfig | None = None) -> BudgetDecision:
    """The largest N whose whole adaptation run (all epochs) fits ``budget_flops``.

    The daemon's planner (:class:`policies.budget.BudgetPlanner`) solves it, on the one cost
    model (:func:`mpnp.cost_model.adaptation_cost`).
    """
    steps = train.epochs * math.ceil(len(data) / train.batch_size)
    text = mean_text_tokens(tokenizer, data, sample=256, batch_size=train.batch_size)
    cost = adaptation_cost(llm, modalities, text, batch=train.batch_size, connection=connection)
    planner = BudgetPlanner(PlannerConfig(batch_size=train.batch_size, target_steps=steps,
                                          min_steps=1))
    plan = planner.plan_flops(budget_flops, cost, steps)
    if not plan.feasible:
        log.warning("%s; using N=%d", plan.reason, plan.n_blocks)
    decision = BudgetDecision(plan.n_blocks, budget_flops, steps, cost.mpnp(plan.n_blocks),
                              cost.full_finetune())
    log.info("budget %.3g FLOPs over %d steps -> N=%d (%.3g FLOPs/step analytic)",
             budget_flops, steps, plan.n_blocks, decision.step_flops)
    return decision


def runtime_adapt(
    serving: Connector,
    mode: str,
    specs: dict[str, ModalitySpec],
    train: FeatureSet,
    val: FeatureSet | None,
    config: TrainConfig,
    *,
    num_blocks: int | None = None,
    budget_flops: float | None = None,
    name: str | None = None,
    connection_changes: dict | None = None,
    aligners_from: str | None = None,
    progress: bool = True,
    new: Sequence[str] = DEFAULT_NEW,
) -> tuple[Connector, TrainReport, BudgetDecision | None]:
    """Select → Reconnect → Adapt on a fork of ``serving``; returns the adapted fork.

    ``new`` are the modalities the context change brings (``switch``: they replace the
    serving ones; ``add``: they join them); ``train``/``val`` are the new context's data.

    For mPnP, ``num_blocks`` (or, if ``None``, the one solved from ``budget_flops``)
    sets N of the fork, and ``connection_changes`` alter its connection config before the
    new modalities are added (the ablations); ``aligners_from`` names a resident state
    whose pretrained aligners the newly added modalities start from (the offline stage's
    aligners for every modality) instead of a fresh initialisation. Other connectors have
    no N and ignore these.
    """
    modalities = select_modalities(mode, specs, new, serving.modality_names or ("camera",))
    decision = None
    if isinstance(serving, MPnPConnector) and num_blocks is None and budget_flops is not None:
        decision = plan_num_blocks(serving.model.llm, serving.tokenizer, modalities, train,
                                   config, budget_flops,
                                   serving.model.states[serving.state_name].config)
        num_blocks = decision.num_blocks
    # Fork, connect and set N under the run's own random stream (fresh aligners and LoRA
    # are initialised from the seed alone), exactly as the daemon's backend does.
    fork = prepare_candidate(serving, modalities, name or f"{serving.kind}-{mode}",
                             seed=config.seed, num_blocks=num_blocks,
                             connection_changes=connection_changes,
                             aligners_from=aligners_from)
    log.info("adapting %s (%s) with %s on %d samples", fork.kind, mode,
             [m.name for m in modalities], len(train))
    report = Trainer(fork, config).fit(train, val, progress=progress)
    return fork, report, decision
