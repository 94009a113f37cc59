"""The narrow interface between the daemon's engine and whatever owns the model.

The engine never touches torch: every model operation goes through :class:`ModelBackend`.
The backend holds two states: the *serving* state (what :meth:`~ModelBackend.answer` uses,
always the last good one) and, during an adaptation run, an *adapted* candidate that
:meth:`~ModelBackend.adaptation_step` trains one bounded step at a time. The engine decides
whether the candidate replaces the serving state (:meth:`~ModelBackend.commit_adapted`, an
atomic swap) or is thrown away (:meth:`~ModelBackend.discard_adapted`).

A backend that knows which modality set its serving state connects may say so with an
optional ``serving_modalities() -> frozenset[str]``; the engine then takes that as the one
source of truth (and passes it back to :meth:`~ModelBackend.answer`).

A backend that can *compose* (training-free, :mod:`aligners.compose`) says so with an optional
``compose_candidate`` (:class:`ComposingBackend`): it builds the candidate from stored
single-modality states instead of training one, and the engine validates, commits or
discards it through the same calls as an adapted candidate. :func:`can_compose` tells.

Backends are found by name in a registry, or as ``module:factory`` (a callable taking the
``model.options`` of the daemon config as keyword arguments).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from mpnp.cost_model import CostModel
from mpnp.registry import Registry, UnknownNameError
from scenes.sample import Frame

Which = Literal["serving", "adapted"]


@dataclass(frozen=True)
class AdaptProgress:
    """What one adaptation step reports.

    Attributes:
        step: steps done so far in this run (1-based after the first step).
        total_steps: steps the backend was asked for.
        loss: training loss of this step, if computed.
        samples: training samples seen so far.
        phase: ``baseline`` (validating the serving state), ``train`` or ``validate`` (the
            candidate): a backend may spread validation over bounded steps too, so that no
            single call keeps a question waiting long.
    """

    step: int
    total_steps: int
    loss: float | None = None
    samples: int = 0
    phase: str = "train"


@runtime_checkable
class ModelBackend(Protocol):
    def answer(
        self, questions: list[str], frames: list[Frame] | None, modalities: frozenset[str]
    ) -> list[str]:
        """Answer each question (``frames[i]`` goes with ``questions[i]``) with the serving
        state, using only ``modalities`` of the frames."""
        ...

    def start_adaptation(
        self, modalities: frozenset[str], n_blocks: int, steps: int, batch_size: int
    ) -> None:
        """Select + reconnect ``modalities`` into a fresh candidate with the last
        ``n_blocks`` blocks connected, to be trained for (about) ``steps`` optimizer steps
        of ``batch_size`` samples."""
        ...

    def adaptation_step(self) -> AdaptProgress | None:
        """Run one bounded piece of work on the candidate (a training micro-step or a
        validation chunk); ``None`` when training and validation are done."""
        ...

    def set_total_steps(self, steps: int) -> None:
        """The planner re-planned: train ``steps`` optimizer steps in total (never fewer
        than already done; as many as done means: stop training now and validate)."""
        ...

    def validation_accuracy(self, which: Which) -> float:
        """Accuracy in 0..1 of the ``serving`` state or the ``adapted`` candidate on the
        validation split of the current context (the candidate's modality set)."""
        ...

    def commit_adapted(self) -> None:
        """Atomically make the candidate the serving state."""
        ...

    def discard_adapted(self) -> None:
        """Drop the candidate; the serving state is untouched."""
        ...

    def save_state(self, path: Path) -> None:
        """Write the serving state's trainable tensors to ``path`` (safetensors)."""
        ...

    def load_state(self, path: Path) -> None:
        """Replace the serving state by one written by :meth:`save_state`."""
        ...

    def cost_model(self) -> CostModel:
        """Per-sample FLOPs of adaptation (for the budget planner)."""
        ...


@dataclass(frozen=True)
class ComposeInput:
    """One stored state a composition starts from (the engine picks them from its store).

    Attributes:
        name: the store entry (``state-00000003``).
        generation: its store generation.
        modalities: the modality set it serves.
        path: its file (:func:`aligners.state.write_state_file` format for ``mpnp``).
    """

    name: str
    generation: int
    modalities: tuple[str, ...]
    path: Path

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "generation": self.generation,
                "modalities": list(self.modalities)}


class ComposeError(ValueError):
    """States that cannot be composed: made for another LLM, conflicting configs or
    aligners, an unknown method. Nothing changed in the backend."""


@runtime_checkable
class ComposingBackend(Protocol):
    def compose_candidate(
        self, inputs: list[ComposeInput], modalities: frozenset[str], method: str,
        max_evals: int,
    ) -> dict[str, Any]:
        """Compose ``inputs`` (one per modality of ``modalities``) into the candidate.

        ``method`` is ``naive``, ``naive-ab``, ``damc`` (λ searched on held-out questions,
        at most ``max_evals`` evaluations) or ``auto`` (the backend's choice: ``damc`` where
        it can search λ, else ``naive``). Afterwards the candidate behaves like an adapted
        one with no training steps: :meth:`ModelBackend.adaptation_step` runs its bounded
        validation units (``None`` when done), :meth:`~ModelBackend.validation_accuracy`,
        :meth:`~ModelBackend.commit_adapted` and :meth:`~ModelBackend.discard_adapted` work
        as for a trained candidate.

        Returns:
            Provenance, JSON-able: at least ``method`` (the one used), ``lambdas`` (or
            ``None``), ``num_blocks`` and ``compose_s`` (seconds to compose, λ search
            included), and ``search`` (the λ search's cost, or ``None``).

        Raises:
            ComposeError: the inputs cannot be composed; the serving state is untouched.
        """
        ...


def can_compose(backend: object) -> bool:
    """Whether ``backend`` implements the optional :class:`ComposingBackend` capability."""
    return callable(getattr(backend, "compose_candidate", None))


BACKEND_METHODS: tuple[str, ...] = (
    "answer", "start_adaptation", "adaptation_step", "set_total_steps", "validation_accuracy",
    "commit_adapted", "discard_adapted", "save_state", "load_state", "cost_model",
)
BackendFactory = Callable[..., ModelBackend]
#: Built-in backends are imported (heavy: torch) only when named.
BACKENDS: Registry[BackendFactory] = Registry("model backend",
                                              lazy={"mpnp": "daemon.mpnp_backend"})


def register_backend(name: str, factory: BackendFactory) -> None:
    BACKENDS.register(name, factory)


def list_backends() -> list[str]:
    return BACKENDS.names()


def create_backend(spec: str, options: dict[str, Any] | None = None) -> ModelBackend:
    """Build the backend named ``spec`` (registered name or ``module:factory``)."""
    options = options or {}
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"model.backend {spec!r} cannot be imported: {exc}") from exc
    else:
        try:
            factory = BACKENDS.get(spec)
        except UnknownNameError as exc:
            raise UnknownNameError(BACKENDS.what, spec, exc.known + ["module:factory"]) from None
    backend = factory(**options)
    missing = [name for name in BACKEND_METHODS if not callable(getattr(backend, name, None))]
    if missing:
        raise ValueError(f"model backend {spec!r} lacks {sorted(missing)}")
    return backend
