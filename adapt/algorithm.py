"""Algorithm 1 at runtime: Select → Reconnect → Adapt, with N from the caller or a budget.

From the offline state (camera, trained on day data) a context change selects a new
modality set — **switch** (C → L) or **add** (C → C+L) — connects it on a *fork* of the
serving connector (the serving one keeps answering, untouched), and adapts the fork on the
new context's training data. ``N`` is either given or solved from a FLOPs budget for the
whole run through the analytic cost model (:mod:`mpnp.cost_model`), which is conservative for
mPnP here: the trainer's lower-block replay makes the measured cost lower than the model's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from adapt.connectors.base import Connector
from adapt.connectors.mpnp import MPnPConnector
from adapt.features import FeatureSet
from adapt.trainer import TrainConfig, Trainer, TrainReport
from aligners.config import ModalitySpec
from mpnp.cost_model import aligner_flops_per_token, analytic_step_cost, solve_num_blocks
from mpnp.generation import encode_training
from mpnp.llm import llm_geometry

log = logging.getLogger(__name__)

#: Runtime modes: which modality set replaces the camera.
MODES: dict[str, tuple[str, ...]] = {"switch": ("lidar",), "add": ("camera", "lidar")}


@dataclass
class BudgetDecision:
    """How N was chosen (kept for logs and reports)."""

    num_blocks: int
    budget_flops: float | None
    steps: int
    step_flops: float  # analytic, at the chosen N
    full_step_flops: float  # analytic, full fine-tuning


def select_modalities(mode: str, specs: dict[str, ModalitySpec]) -> list[ModalitySpec]:
    """Select: the modality set of ``mode`` (``switch`` or ``add``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    missing = [m for m in MODES[mode] if m not in specs]
    if missing:
        raise ValueError(f"mode {mode!r} needs modalities {missing}; have {sorted(specs)}")
    return [specs[m] for m in MODES[mode]]


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
                    train: TrainConfig, budget_flops: float) -> BudgetDecision:
    """The largest N whose whole adaptation run (all epochs) fits ``budget_flops``."""
    steps = train.epochs * math.ceil(len(data) / train.batch_size)
    kv_width = llm_geometry(llm).kv_width
    prefix = sum(m.num_tokens for m in modalities)
    per_token = sum(m.num_tokens * aligner_flops_per_token(m.embed_dim, kv_width)
                    for m in modalities) / max(prefix, 1)
    cost = analytic_step_cost(llm, batch=train.batch_size,
                              text_tokens=mean_text_tokens(tokenizer, data, sample=256,
                                                           batch_size=train.batch_size),
                              prefix_tokens=prefix, aligner_flops_per_token=per_token)
    n = solve_num_blocks(cost, budget_flops / steps)
    if n == 0:
        log.warning("budget %.3g FLOPs does not fit even N=1 (needs %.3g); using N=1",
                    budget_flops, cost.mpnp(1) * steps)
        n = 1
    decision = BudgetDecision(n, budget_flops, steps, cost.mpnp(n), cost.full_finetune())
    log.info("budget %.3g FLOPs over %d steps -> N=%d (%.3g FLOPs/step analytic)",
             budget_flops, steps, n, decision.step_flops)
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
    progress: bool = True,
) -> tuple[Connector, TrainReport, BudgetDecision | None]:
    """Select → Reconnect → Adapt on a fork of ``serving``; returns the adapted fork.

    For mPnP, ``num_blocks`` (or, if ``None``, the one solved from ``budget_flops``)
    sets N of the fork, and ``connection_changes`` alter its connection config before the
    new modalities are added (the ablations); other connectors have no N and ignore them.
    """
    modalities = select_modalities(mode, specs)
    fork = serving.fork(name or f"{serving.kind}-{mode}")
    if connection_changes and isinstance(fork, MPnPConnector):
        fork.update_connection(**connection_changes)
    fork.set_modalities(modalities)
    decision = None
    if isinstance(fork, MPnPConnector):
        if num_blocks is None and budget_flops is not None:
            decision = plan_num_blocks(fork.model.llm, fork.tokenizer, modalities, train,
                                       config, budget_flops)
            num_blocks = decision.num_blocks
        if num_blocks is not None:
            fork.set_num_blocks(num_blocks)
    log.info("adapting %s (%s) with %s on %d samples", fork.kind, mode,
             [m.name for m in modalities], len(train))
    report = Trainer(fork, config).fit(train, val, progress=progress)
    return fork, report, decision
