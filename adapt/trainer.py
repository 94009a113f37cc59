"""The training loop: trains whatever a connector marks trainable, and measures what it cost.

- Loss on the answer tokens only (the connector's :meth:`~adapt.connectors.base.Connector.loss`).
- AdamW with one parameter group per connector group name and the learning rate configured
  for that name (the official mPnP values by default: 2e-5 aligners/LoRA, 1e-1 connections).
- Epochs, batch size, seed, gradient clipping, early stop on a validation plateau (the best
  epoch's weights are restored), checkpoints after each epoch and resume from them.
- Every run reports its measured FLOPs (``torch.utils.flop_counter``), peak memory above
  what was resident when it started (RSS on CPU, ``max_memory_allocated`` on CUDA), wall
  time and samples/s.

:meth:`Trainer.step` is one bounded optimizer step, for callers that interleave training
with other work (the daemon's engine loop).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from adapt.connectors.base import Connector
from adapt.evaluate import EvalResult, evaluate
from adapt.features import Batch, FeatureSet
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
CHECKPOINT_FORMAT = 1


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, unusable checkpoint ...)."""


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        epochs: passes over the training set (an upper bound when early stopping).
        batch_size: samples per optimizer step.
        seed: shuffling and initialisation seed.
        learning_rates: per parameter-group name; a group the connector has but this
            lacks is an error (no silent default).
        weight_decay: AdamW weight decay.
        grad_clip: max global gradient norm (``0`` = no clipping).
        patience: stop after this many epochs without a better validation accuracy
            (``0`` = never stop early); needs a validation set.
        min_delta: an improvement smaller than this is a plateau.
        count_flops: count the FLOPs of every step (small overhead on CPU).
    """

    epochs: int = 8
    batch_size: int = 16
    seed: int = 0
    learning_rates: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_LEARNING_RATES)
    )
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    patience: int = 2
    min_delta: float = 1e-3
    count_flops: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                             f"{self.batch_size}")
        if self.grad_clip < 0 or self.patience < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip, patience and weight_decay must be >= 0")
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
    """Trains one connector; see the module docstring."""

    def __init__(self, connector: Connector, config: TrainConfig | None = None):
        self.connector = connector
        self.config = config or TrainConfig()
        torch.manual_seed(self.config.seed)
        self.trainable_names = connector.set_trainable()
        groups = connector.parameter_groups()
        missing = sorted(set(groups) - set(self.config.learning_rates))
        if missing:
            raise ValueError(
                f"no learning rate for parameter groups {missing} of {connector.kind!r}; "
                f"set TrainConfig.learning_rates[...]"
            )
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": self.config.learning_rates[name], "name": name}
             for name, ps in groups.items()],
            weight_decay=self.config.weight_decay,
        )
        self._params = [p for ps in groups.values() for p in ps]
        self.report = TrainReport(trainable_params=sum(p.numel() for p in self._params))
        self._epoch_done = 0
        self._best_acc = -math.inf
        self._best: dict[str, torch.Tensor] | None = None
        self._flops = FlopCounterMode(display=False) if self.config.count_flops else None

    # ------------------------------------------------------------------ one step

    def step(self, batch: Batch) -> float:
        """One optimizer step on ``batch``; returns its loss (FLOPs are added to the report)."""
        self.connector.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self._flops is not None:
            with self._flops:
                loss = self.connector.loss(batch)
                loss.backward()
            self.report.flops += self._flops.get_total_flops()
            self._flops = FlopCounterMode(display=False)  # fresh counter, no accumulation
        else:
            loss = self.connector.loss(batch)
            loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"training loss is {value} at step {self.report.steps + 1}")
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.config.grad_clip)
        self.optimizer.step()
        self.report.steps += 1
        self.report.samples += len(batch)
        return value

    # ------------------------------------------------------------------ the loop

    def fit(self, train: FeatureSet, val: FeatureSet | None = None, *, progress: bool = True,
            checkpoint_dir: str | Path | None = None, eval_batch_size: int = 32) -> TrainReport:
        """Train for the configured epochs (or until the validation plateau).

        With ``checkpoint_dir`` a checkpoint is written after every epoch and an existing
        one is resumed from (same connector and config expected).
        """
        if len(train) == 0:
            raise ValueError("the training set is empty")
        cfg = self.config
        if checkpoint_dir is not None:
            self._resume(Path(checkpoint_dir))
        device = self.connector.device()
        started = time.perf_counter()
        with PeakMemory(device, interval_s=0.005) as mem:
            for epoch in range(self._epoch_done, cfg.epochs):
                loss = self._epoch(train, epoch, progress)
                self.report.losses.append(loss)
                self._epoch_done = epoch + 1
                self.report.epochs_run = self._epoch_done
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

    def _epoch(self, train: FeatureSet, epoch: int, progress: bool) -> float:
        cfg = self.config
        batches = train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)
        total = math.ceil(len(train) / cfg.batch_size)
        bar = tqdm(batches, total=total, desc=f"{self.connector.kind} epoch {epoch + 1}/"
                   f"{cfg.epochs}", disable=not progress, leave=False)
        losses = []
        for batch in bar:
            losses.append(self.step(batch))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        return sum(losses) / len(losses)

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
        """Trainable tensors + optimizer moments + progress, written atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"param/{n}": t for n, t in self._snapshot().items()}
        index = {id(p): n for n, p in self._named_trainables().items()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        tensors[f"optim/{index[id(p)]}/{key}"] = value.detach().cpu().contiguous()
        if self._best is not None:
            tensors.update({f"best/{n}": t for n, t in self._best.items()})
        meta = {
            "type": "mpnp.checkpoint", "format_version": CHECKPOINT_FORMAT,
            "connector": self.connector.kind, "epoch": self._epoch_done,
            "best_acc": self._best_acc if self._best is not None else None,
            "report": self.report.to_dict(), "config": asdict(self.config),
        }
        tmp = directory / "checkpoint.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        _fsync_replace(tmp, directory / "checkpoint.safetensors")
        tmp_json = directory / "checkpoint.json.tmp"
        tmp_json.write_text(json.dumps(meta, indent=2))
        _fsync_replace(tmp_json, directory / "checkpoint.json")

    def _resume(self, directory: Path) -> None:
        meta_path, tensor_path = directory / "checkpoint.json", directory / "checkpoint.safetensors"
        if not meta_path.exists():
            return
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(tensor_path))
        except (OSError, ValueError, SafetensorError) as exc:
            raise TrainingError(
                f"checkpoint in {directory} is unreadable ({exc}); delete it to start over"
            ) from exc
        if meta.get("type") != "mpnp.checkpoint" or meta.get("connector") != self.connector.kind:
            raise TrainingError(f"{meta_path} is not a {self.connector.kind!r} checkpoint")
        params = {n[len("param/"):]: t for n, t in tensors.items() if n.startswith("param/")}
        if set(params) != set(self._named_trainables()):
            raise TrainingError(f"{tensor_path} holds other trainable tensors than this connector")
        self._restore(params)
        named = self._named_trainables()
        for name, p in named.items():
            state = {k.rsplit("/", 1)[1]: v.to(p.device) for k, v in tensors.items()
                     if k.startswith(f"optim/{name}/")}
            if state:
                self.optimizer.state[p] = state
        best = {n[len("best/"):]: t for n, t in tensors.items() if n.startswith("best/")}
        self._best = best or None
        self._best_acc = meta["best_acc"] if meta.get("best_acc") is not None else -math.inf
        self._epoch_done = int(meta["epoch"])
        rep = meta["report"]
        rep.pop("samples_per_s", None)
        self.report = TrainReport(**rep)
        log.info("resumed from %s after epoch %d", directory, self._epoch_done)


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
