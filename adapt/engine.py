"""The one training engine: a resumable stepper of bounded units.

:class:`AdaptationStepper` owns everything a run of Adapt needs — the optimizer (one AdamW
group per connector group), the data order, gradient accumulation over micro-batches,
clipping, FLOP counting and a private random stream — and advances it one *micro-step* at
a time. :class:`adapt.trainer.Trainer` drives it epoch by epoch (``mpnp adapt``, Table 1);
the daemon's backend drives it through an :class:`AdaptationJob` one unit per engine step,
between questions. Both therefore run the very same loop: the same connector, data, seed
and N give bit-identical tensors and equal counted FLOPs on either path (tested).

Data order: epoch ``e`` (0-based) is ``range(len(train))`` shuffled by
``random.Random(seed * 1000 + e)``, cut into batches of ``batch_size`` (the last one of an
epoch may be smaller); a batch is split into micro-batches of ``micro_batch`` samples whose
losses are weighted by their share of the batch, and the optimizer steps once per batch.

Nothing here touches the global torch RNG: dropout and the initialisation of fresh aligners
draw from a :class:`PrivateRNG` (in a serving process the global stream belongs to others).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from adapt.connectors.base import Connector
from adapt.evaluate import ChunkedValidation
from adapt.features import Batch, FeatureSet
from adapt.precision import autocast_context
from aligners.config import ModalitySpec

if TYPE_CHECKING:
    from adapt.trainer import TrainConfig

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, unusable checkpoint ...)."""


class PrivateRNG:
    """A torch random stream of its own, seeded once.

    Code run under :meth:`active` draws from this stream (dropout, ``nn.Linear`` init); the
    global CPU (and the device's CUDA) generator state is restored afterwards, so the
    process's own stream is neither reseeded nor advanced.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._devices = ([self.device.index if self.device.index is not None
                          else torch.cuda.current_device()] if self._cuda else [])
        with torch.random.fork_rng(devices=self._devices):
            torch.default_generator.manual_seed(seed)
            if self._cuda:
                with torch.cuda.device(self._devices[0]):
                    torch.cuda.manual_seed(seed)
            self._save()

    def _save(self) -> None:
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = (torch.cuda.get_rng_state(self._devices[0]) if self._cuda else None)

    @contextmanager
    def active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self._devices):
            torch.set_rng_state(self.cpu_state)
            if self._cuda:
                torch.cuda.set_rng_state(self.cuda_state, self._devices[0])
            try:
                yield
            finally:
                self._save()


def prepare_candidate(serving: Connector, modalities: Sequence[ModalitySpec], name: str, *,
                      seed: int, num_blocks: int | None = None,
                      connection_changes: dict | None = None,
                      aligners_from: str | None = None) -> Connector:
    """Fork ``serving`` and connect ``modalities`` on the fork (N set when given).

    Fresh aligners of new modalities are initialised from a private stream seeded by
    ``seed``, so the candidate depends on the seed alone, never on the process's RNG.
    With ``aligners_from`` (a resident mPnP state) the modalities the fork did not have
    start from that state's pretrained aligners instead (Algorithm 1: the offline stage
    prepares aligners for every modality).
    """
    from adapt.connectors.mpnp import MPnPConnector

    with PrivateRNG(seed, serving.device()).active():
        fork = serving.fork(name)
        if connection_changes and isinstance(fork, MPnPConnector):
            fork.update_connection(**connection_changes)
        had = set(fork.model.states[fork.state_name].aligners) \
            if isinstance(fork, MPnPConnector) else set()
        fork.set_modalities(modalities)
        if aligners_from is not None and isinstance(fork, MPnPConnector):
            donor = fork.model.states[aligners_from].aligners
            new = [m.name for m in modalities if m.name not in had and m.name in donor]
            if new:
                fork.model.activate(fork.state_name)
                fork.model.copy_aligners(aligners_from, *new)
                log.info("%s: aligners of %s start from the pretrained state %r",
                         fork.state_name, new, aligners_from)
        if num_blocks is not None and isinstance(fork, MPnPConnector):
            fork.set_num_blocks(num_blocks)
    return fork


@dataclass(frozen=True)
class MicroStep:
    """What one micro-step did.

    Attributes:
        samples: samples in this micro-batch.
        loss: this micro-batch's loss weighted by its share of the batch.
        stepped: an optimizer step completed with it.
        step_loss: the batch's loss when ``stepped`` (sum of the weighted micro losses).
        epoch_end: the epoch's last batch completed with it.
        epoch_loss: mean batch loss of that epoch when ``epoch_end``.
    """

    samples: int
    loss: float
    stepped: bool
    step_loss: float | None
    epoch_end: bool
    epoch_loss: float | None


class AdaptationStepper:
    """Trains ``connector`` one bounded micro-step at a time; see the module docstring.

    Args:
        connector: what trains (its :meth:`~Connector.parameter_groups`).
        config: learning rates, batch, micro-batch, seed, clipping, FLOP counting.
        train: the training set (optional until :meth:`micro_step`; :meth:`train_on` trains
            on explicit batches without one).
        total_steps: optimizer steps of the run (default: ``config.epochs`` epochs).
    """

    def __init__(self, connector: Connector, config: TrainConfig,
                 train: FeatureSet | None = None, *, total_steps: int | None = None) -> None:
        self.connector = connector
        self.config = config
        self.rng = PrivateRNG(config.seed, connector.device())
        self.trainable_names = connector.set_trainable()
        groups = connector.parameter_groups()
        missing = sorted(set(groups) - set(config.learning_rates))
        if missing:
            raise ValueError(
                f"no learning rate for parameter groups {missing} of {connector.kind!r}; "
                f"set TrainConfig.learning_rates[...]"
            )
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": config.learning_rates[name], "name": name}
             for name, ps in groups.items()],
            weight_decay=config.weight_decay,
        )
        self.params = [p for ps in groups.values() for p in ps]
        self.trainable_params = sum(p.numel() for p in self.params)
        self.steps = 0
        self.samples = 0
        self.micro_steps = 0
        self.flops = 0.0
        #: Counted FLOPs per step signature (see :meth:`_forward_backward`).
        self.flops_by_signature: dict[tuple, float] = {}
        self.loss: float | None = None  # the last optimizer step's loss
        self.epoch = 0  # the epoch in progress (0-based)
        self.train: FeatureSet | None = None
        self.total_steps = 0
        self._batch_index = 0  # next batch within the epoch
        self._pending: list[int] = []  # indices of the current batch not yet stepped on
        self._batch_size = 0  # samples of the current batch
        self._step_loss = 0.0
        self._accumulated = 0  # samples accumulated into the optimizer step in progress
        self._epoch_losses: list[float] = []
        if train is not None:
            self.use_data(train, total_steps)

    # ------------------------------------------------------------------ data

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self._require_data()) / self.config.batch_size)

    def use_data(self, train: FeatureSet, total_steps: int | None = None) -> None:
        """Train on ``train`` from now on, for ``total_steps`` optimizer steps in all."""
        if len(train) == 0:
            raise ValueError("the training set is empty")
        self.train = train
        self.total_steps = (self.config.epochs * self.steps_per_epoch()
                            if total_steps is None else total_steps)

    def set_total_steps(self, steps: int) -> None:
        """Re-plan: ``steps`` in all, never fewer than done (as many as done: stop now; the
        micro-batches of an unfinished optimizer step are dropped, it never happens)."""
        self.total_steps = max(steps, self.steps)
        if self.done and self._accumulated:
            self._pending, self._accumulated, self._step_loss = [], 0, 0.0
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def done(self) -> bool:
        return self.steps >= self.total_steps

    def _require_data(self) -> FeatureSet:
        if self.train is None:
            raise RuntimeError("no training data: call use_data() first")
        return self.train

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._require_data())))
        random.Random(self.config.seed * 1000 + epoch).shuffle(order)
        return order

    def _micro_size(self) -> int:
        return self.config.micro_batch or self.config.batch_size

    # ------------------------------------------------------------------ units

    def micro_step(self) -> MicroStep:
        """One micro-batch forward/backward of the data order; an optimizer step when it
        completes its batch."""
        if self.done:
            raise RuntimeError(f"the run is complete ({self.steps} steps)")
        train = self._require_data()
        if not self._pending:
            bs = self.config.batch_size
            order = self.epoch_order(self.epoch)
            self._pending = order[self._batch_index * bs:(self._batch_index + 1) * bs]
            self._batch_size = len(self._pending)
        take, self._pending = (self._pending[:self._micro_size()],
                               self._pending[self._micro_size():])
        batch = train.batch(take, self.connector.modality_names)
        loss = self._micro(batch, self._batch_size)
        if self._pending:
            return MicroStep(len(take), loss, False, None, False, None)
        step_loss = self._optimizer_step()
        self._epoch_losses.append(step_loss)
        self._batch_index += 1
        if self._batch_index < self.steps_per_epoch():
            return MicroStep(len(take), loss, True, step_loss, False, None)
        epoch_loss = sum(self._epoch_losses) / len(self._epoch_losses)
        self._epoch_losses = []
        self.epoch += 1
        self._batch_index = 0
        return MicroStep(len(take), loss, True, step_loss, True, epoch_loss)

    def train_on(self, batch: Batch) -> float:
        """One optimizer step on an explicit ``batch`` (micro-batched like the data order);
        returns its loss. Outside the data order: for benchmarks and tests."""
        size = self._micro_size()
        for start in range(0, len(batch), size):
            rows = list(range(start, min(start + size, len(batch))))
            self._micro(_rows(batch, rows), len(batch))
        return self._optimizer_step()

    def _micro(self, batch: Batch, batch_size: int) -> float:
        if self._accumulated == 0:
            self.optimizer.zero_grad(set_to_none=True)
        weight = len(batch) / batch_size
        with self.rng.active():
            self.connector.train()
            loss = self._forward_backward(batch, weight)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"training loss is {value} at step {self.steps + 1}")
        self._step_loss += value
        self._accumulated += len(batch)
        self.samples += len(batch)
        self.micro_steps += 1
        return value

    def _forward_backward(self, batch: Batch, weight: float) -> torch.Tensor:
        """Loss × ``weight``, backward, FLOPs counted.

        Counting costs as much Python time as a micro-step computes on a CPU (and a question
        in the daemon waits for it), so a connector that can name a step's cost
        (``step_signature``: mPnP) is counted once per distinct signature and the count is
        reused for every later step with the same signature.
        """
        if not self.config.count_flops:
            loss = self._loss(batch) * weight
            loss.backward()
            return loss
        signature = getattr(self.connector, "step_signature", None)
        key = signature(batch) if callable(signature) else None
        counted = self.flops_by_signature.get(key) if key is not None else None
        if counted is None:
            counter = FlopCounterMode(display=False)
            with counter:
                loss = self._loss(batch) * weight
                loss.backward()
            counted = counter.get_total_flops()
            if key is not None:
                self.flops_by_signature[key] = counted
        else:
            loss = self._loss(batch) * weight
            loss.backward()
        self.flops += counted
        return loss

    def _loss(self, batch: Batch) -> torch.Tensor:
        """The connector's loss, under the configured autocast (backward follows the
        forward's dtypes, so only the forward needs the context)."""
        with autocast_context(self.config.autocast, self.connector.device()):
            return self.connector.loss(batch).float()

    def _optimizer_step(self) -> float:
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        value, self._step_loss, self._accumulated = self._step_loss, 0.0, 0
        self.steps += 1
        self.loss = value
        return value

    # ------------------------------------------------------------------ resume

    def progress_state(self) -> dict[str, Any]:
        """Where the run stands (JSON-able), for checkpoints; see :meth:`load_progress`."""
        if self._pending:
            raise RuntimeError("a checkpoint must fall between optimizer steps")
        return {"steps": self.steps, "samples": self.samples, "micro_steps": self.micro_steps,
                "flops": self.flops, "epoch": self.epoch, "batch_index": self._batch_index,
                "total_steps": self.total_steps, "epoch_losses": list(self._epoch_losses)}

    def load_progress(self, state: dict[str, Any]) -> None:
        for key in ("steps", "samples", "micro_steps", "flops", "epoch", "total_steps"):
            setattr(self, key, type(getattr(self, key))(state[key]))
        self._batch_index = int(state["batch_index"])
        self._epoch_losses = list(state.get("epoch_losses", []))

    def rng_tensors(self) -> dict[str, torch.Tensor]:
        out = {"rng/cpu": self.rng.cpu_state.clone()}
        if self.rng.cuda_state is not None:
            out["rng/cuda"] = self.rng.cuda_state.clone()
        return out

    def load_rng_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "rng/cpu" in tensors:
            self.rng.cpu_state = tensors["rng/cpu"].to(torch.uint8)
        if "rng/cuda" in tensors and self.rng.cuda_state is not None:
            self.rng.cuda_state = tensors["rng/cuda"].to(torch.uint8)


def _rows(batch: Batch, rows: list[int]) -> Batch:
    if rows == list(range(len(batch))):
        return batch
    return Batch([batch.indices[i] for i in rows], [batch.questions[i] for i in rows],
                 [batch.answers[i] for i in rows], [batch.template_types[i] for i in rows],
                 [batch.num_hops[i] for i in rows],
                 {m: t[rows] for m, t in batch.tokens.items()})


class AdaptationJob:
    """A runtime Adapt as bounded units: ``baseline`` (the serving connector on the
    validation split, chunk by chunk), ``train`` (micro-steps of the stepper up to its total
    steps), ``validate`` (the candidate, chunk by chunk), then done.

    The daemon's backend calls :meth:`step` once per engine step; questions are answered
    between calls, so no unit keeps one waiting longer than a micro-step or a chunk.
    """

    def __init__(self, stepper: AdaptationStepper, val: FeatureSet, serving: Connector,
                 chunk: int) -> None:
        self.stepper = stepper
        self.val = val
        self.chunk = chunk
        self.phase = "baseline"
        self.validations = {"serving": ChunkedValidation(serving, val, chunk),
                            "adapted": ChunkedValidation(stepper.connector, val, chunk)}
        # Validation has a stream of its own: whatever it might draw can neither touch the
        # process's RNG nor shift the training stream (so training matches Trainer.fit's).
        self.rng = PrivateRNG(stepper.config.seed, stepper.connector.device())

    def step(self) -> str | None:
        """Run one unit; returns its phase (``None`` once everything is done)."""
        did = self.phase
        if self.phase == "baseline":
            with self.rng.active():
                if self.validations["serving"].step():
                    self.phase = "train"
        elif self.phase == "train":
            if not self.stepper.done:
                self.stepper.micro_step()
            if self.stepper.done:
                self.phase = "validate"
        elif self.phase == "validate":
            with self.rng.active():
                if self.validations["adapted"].step():
                    self.phase = "done"
        else:
            return None
        return did

    def accuracy(self, which: str) -> float:
        """Validation accuracy of ``serving`` or ``adapted`` (the rest scored now if the
        run was ended early)."""
        validation = self.validations[which]
        with self.rng.active():
            return validation.run().accuracy
