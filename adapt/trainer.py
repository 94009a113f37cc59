"""The training loop: trains whatever a connector marks trainable, and measures what it cost.

- Loss on the answer tokens only (the connector's :meth:`~adapt.connectors.base.Connector.loss`).
- AdamW with one parameter group per connector group name and the learning rate configured
  for that name (the official mPnP values by default: 2e-5 aligners/LoRA, 1e-1 connections).
- Epochs, batch size, seed, gradient clipping, early stop on a validation plateau (the best
  epoch's weights are restored), checkpoints after each epoch and resume from them.
- Every run reports its measured FLOPs (``torch.utils.flop_counter``), peak memory above
  what was resident when it started (RSS on CPU, ``max_memory_allocated`` on CUDA), wall
  time and samples/s.

The loop itself is :class:`adapt.engine.AdaptationStepper` — the same one the daemon drives
unit by unit — so ``mpnp adapt`` / Table 1 measure the loop the vehicle runs. Checkpoints are
states on disk in :mod:`aligners.state`'s format (``state.safetensors`` + ``state.json``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adapt.connectors.base import Connector
from adapt.engine import AdaptationStepper, TrainingError
from adapt.evaluate import EvalResult, evaluate
from adapt.features import Batch, FeatureSet
from adapt.precision import AUTOCAST_MODES
from aligners.state import StateData, StateError, read_state, write_state
from mpnp.measure import PeakMemory

log = logging.getLogger(__name__)

#: The official mPnP-LLM code's learning rates plus the baselines' groups.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "aligners": 2e-5,
    "lora": 2e-5,
    "connections": 1e-1,
    "llm": 2e-5,
    "projection": 2e-5,
    "prompts": 2e-5,
}
CHECKPOINT_TYPE = "mpnp.checkpoint"
CHECKPOINT_FORMAT = 2

__all__ = ["TrainConfig", "TrainReport", "Trainer", "TrainingError", "DEFAULT_LEARNING_RATES"]


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        epochs: passes over the training set (an upper bound when early stopping).
        batch_size: samples per optimizer step.
        micro_batch: samples per forward/backward (gradients accumulate over a batch's
            micro-batches; ``0`` = the whole batch at once). The daemon uses small ones so
            a question never waits long behind a training unit.
        seed: shuffling and initialisation seed.
        learning_rates: per parameter-group name; a group the connector has but this
            lacks is an error (no silent default).
        weight_decay: AdamW weight decay.
        grad_clip: max global gradient norm (``0`` = no clipping).
        patience: stop after this many epochs without a better validation accuracy
            (``0`` = never stop early); needs a validation set.
        min_delta: an improvement smaller than this is a plateau.
        count_flops: count the FLOPs of the steps (``torch.utils.flop_counter``; for mPnP once
            per distinct step signature, see :class:`adapt.engine.AdaptationStepper`).
        autocast: ``"bfloat16"`` runs each step's forward/backward under bfloat16 autocast
            (the trained tensors and the optimizer stay float32); ``"auto"`` does so where
            the device has bfloat16 matrix units (:func:`adapt.precision.bf16_supported`: AMX /
            AVX512-BF16 CPUs, Ampere-and-later GPUs); ``"off"`` (default) never.
    """

    epochs: int = 8
    batch_size: int = 16
    micro_batch: int = 0
    seed: int = 0
    learning_rates: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_LEARNING_RATES)
    )
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    patience: int = 2
    min_delta: float = 1e-3
    count_flops: bool = True
    autocast: str = "off"

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast must be one of {AUTOCAST_MODES}, got {self.autocast!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                             f"{self.batch_size}")
        if self.grad_clip < 0 or self.patience < 0 or self.weight_decay < 0 or self.micro_batch < 0:
            raise ValueError("grad_clip, patience, weight_decay and micro_batch must be >= 0")
        bad = {k: v for k, v in self.learning_rates.items() if not v > 0}
        if bad:
            raise ValueError(f"learning rates must be > 0, got {bad}")

    def with_rates(self, **rates: float) -> TrainConfig:
        """A copy with some learning rates replaced."""
        data = asdict(self)
        data["learning_rates"] = {**self.learning_rates, **rates}
        return TrainConfig(**data)


@dataclass
class TrainReport:
    """What a run did and what it cost."""

    epochs_run: int = 0
    steps: int = 0
    samples: int = 0
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    val_accuracy: list[float] = field(default_factory=list)  # per epoch
    best_epoch: int = 0
    stopped_early: bool = False
    flops: float = 0.0
    peak_mem_bytes: int = 0
    wall_s: float = 0.0
    trainable_params: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "samples_per_s": self.samples_per_s}


class Trainer:
    """Trains one connector through an :class:`~adapt.engine.AdaptationStepper`; see the
    module docstring. Nothing here seeds the global RNG (the stepper has its own stream)."""

    def __init__(self, connector: Connector, config: TrainConfig | None = None):
        self.connector = connector
        self.config = config or TrainConfig()
        self.stepper = AdaptationStepper(connector, self.config)
        self.trainable_names = self.stepper.trainable_names
        self.optimizer = self.stepper.optimizer
        self.report = TrainReport(trainable_params=self.stepper.trainable_params)
        self._best_acc = -math.inf
        self._best: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ one step

    def step(self, batch: Batch) -> float:
        """One optimizer step on ``batch``; returns its loss (FLOPs are added to the report)."""
        value = self.stepper.train_on(batch)
        self._sync_report()
        return value

    def _sync_report(self) -> None:
        s = self.stepper
        self.report.steps, self.report.samples, self.report.flops = s.steps, s.samples, s.flops

    # ------------------------------------------------------------------ the loop

    def fit(self, train: FeatureSet, val: FeatureSet | None = None, *, progress: bool = True,
            checkpoint_dir: str | Path | None = None, eval_batch_size: int = 32,
            on_step: Callable[[int], None] | None = None) -> TrainReport:
        """Train for the configured epochs (or until the validation plateau).

        With ``checkpoint_dir`` a checkpoint is written after every epoch and an existing
        one is resumed from (same connector and config expected). ``on_step`` is called with
        the optimizer steps done after every step (a learning curve's evaluations; its time
        counts into the report's ``wall_s``).
        """
        if len(train) == 0:
            raise ValueError("the training set is empty")
        cfg = self.config
        self.stepper.use_data(train)
        if checkpoint_dir is not None:
            self._resume(Path(checkpoint_dir))
        device = self.connector.device()
        started = time.perf_counter()
        with PeakMemory(device, interval_s=0.005) as mem:
            for epoch in range(self.stepper.epoch, cfg.epochs):
                loss = self._epoch(epoch, progress, on_step)
                self.report.losses.append(loss)
                self.report.epochs_run = epoch + 1
                plateau = False
                if val is not None and len(val):
                    acc = evaluate(self.connector, val, batch_size=eval_batch_size).accuracy
                    self.report.val_accuracy.append(acc)
                    log.info("epoch %d: loss %.4f, val accuracy %.3f", epoch + 1, loss, acc)
                    if acc > self._best_acc + cfg.min_delta:
                        self._best_acc, self.report.best_epoch = acc, epoch + 1
                        self._best = self._snapshot()
                    plateau = (cfg.patience > 0
                               and epoch + 1 - self.report.best_epoch >= cfg.patience)
                else:
                    log.info("epoch %d: loss %.4f", epoch + 1, loss)
                    self.report.best_epoch = epoch + 1
                if checkpoint_dir is not None:
                    self._save_checkpoint(Path(checkpoint_dir))
                if plateau:
                    self.report.stopped_early = True
                    log.info("validation plateau: stopping after epoch %d", epoch + 1)
                    break
            if self._best is not None:
                self._restore(self._best)
        self.report.wall_s += time.perf_counter() - started
        self.report.peak_mem_bytes = max(self.report.peak_mem_bytes, int(mem.peak_bytes))
        return self.report

    def _epoch(self, epoch: int, progress: bool,
               on_step: Callable[[int], None] | None = None) -> float:
        """Micro-steps of the stepper until epoch ``epoch`` is complete; its mean loss."""
        cfg = self.config
        bar = tqdm(total=self.stepper.steps_per_epoch(), desc=f"{self.connector.kind} epoch "
                   f"{epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        try:
            while True:
                unit = self.stepper.micro_step()
                if unit.stepped:
                    bar.update(1)
                    bar.set_postfix(loss=f"{unit.step_loss:.3f}")
                    if on_step is not None:
                        on_step(self.stepper.steps)
                if unit.epoch_end:
                    self._sync_report()
                    return float(unit.epoch_loss)
        finally:
            bar.close()

    def evaluate(self, data: FeatureSet, batch_size: int = 32) -> EvalResult:
        return evaluate(self.connector, data, batch_size=batch_size)

    # ------------------------------------------------------------------ state

    def _named_trainables(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.connector.named_parameters() if p.requires_grad}

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self._named_trainables().items()}

    @torch.no_grad()
    def _restore(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self._named_trainables().items():
            p.copy_(tensors[name].to(p.device))

    def _save_checkpoint(self, directory: Path) -> None:
        """Trainable tensors + optimizer moments + the stepper's progress and random stream,
        as a state directory (:func:`aligners.state.write_state`: atomic, checksummed)."""
        tensors = {f"param/{n}": t for n, t in self._snapshot().items()}
        index = {id(p): n for n, p in self._named_trainables().items()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        tensors[f"optim/{index[id(p)]}/{key}"] = value.detach().cpu().contiguous()
        if self._best is not None:
            tensors.update({f"best/{n}": t for n, t in self._best.items()})
        tensors.update(self.stepper.rng_tensors())
        checkpoint = {
            "type": CHECKPOINT_TYPE, "format_version": CHECKPOINT_FORMAT,
            "connector": self.connector.kind, "progress": self.stepper.progress_state(),
            "best_acc": self._best_acc if self._best is not None else None,
            "report": self.report.to_dict(), "config": asdict(self.config),
        }
        write_state(StateData({"name": "checkpoint", "checkpoint": checkpoint}, tensors),
                    directory)

    def _resume(self, directory: Path) -> None:
        if not directory.exists() or not any(directory.iterdir()):
            return
        try:
            data = read_state(directory)
        except (OSError, ValueError, StateError) as exc:
            raise TrainingError(
                f"checkpoint in {directory} is unreadable ({exc}); delete it to start over"
            ) from exc
        meta = data.config.get("checkpoint") or {}
        if (meta.get("type") != CHECKPOINT_TYPE or meta.get("format_version") != CHECKPOINT_FORMAT
                or meta.get("connector") != self.connector.kind):
            raise TrainingError(f"{directory} is not a {self.connector.kind!r} checkpoint")
        tensors = data.tensors
        params = {n[len("param/"):]: t for n, t in tensors.items() if n.startswith("param/")}
        if set(params) != set(self._named_trainables()):
            raise TrainingError(f"{directory} holds other trainable tensors than this connector")
        self._restore(params)
        for name, p in self._named_trainables().items():
            state = {k.rsplit("/", 1)[1]: v.to(p.device) for k, v in tensors.items()
                     if k.startswith(f"optim/{name}/")}
            if state:
                self.optimizer.state[p] = state
        best = {n[len("best/"):]: t for n, t in tensors.items() if n.startswith("best/")}
        self._best = best or None
        self._best_acc = meta["best_acc"] if meta.get("best_acc") is not None else -math.inf
        progress = dict(meta["progress"])
        progress["total_steps"] = self.stepper.total_steps  # this run's epochs decide
        self.stepper.load_progress(progress)
        self.stepper.load_rng_tensors(tensors)
        rep = meta["report"]
        rep.pop("samples_per_s", None)
        self.report = TrainReport(**rep)
        log.info("resumed from %s after epoch %d", directory, self.stepper.epoch)
