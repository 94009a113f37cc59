"""The real model backend: a resident LLM with mPnP states, frozen encoders from the store.

Registered as ``mpnp`` (``[model] backend = "mpnp"``). A thin adapter over three parts:

- :class:`daemon.encoder_pool.EncoderPool` — the frozen encoders (imported into the daemon's
  :class:`~daemon.store.ModelStore`, loaded on demand through its memory budget) and the
  tokens of recent live frames;
- :class:`adapt.engine.AdaptationStepper` inside an :class:`adapt.engine.AdaptationJob` —
  the one training engine (the same loop as ``mpnp adapt`` and Table 1), run one bounded
  unit per call: ``baseline`` validation chunks (the serving state), ``train`` micro-steps,
  ``validate`` chunks (the candidate);
- :mod:`aligners.state` — the one state format (a store entry is its single-file form);
- :mod:`aligners.compose` — training-free composition of stored states
  (:meth:`MPnPBackend.compose_candidate`), validated by the same job with no training steps.

The runtime training data of each context is, by default (``[adaptation] data = "world"``),
the offline stage's synthetic world (:func:`adapt.prepare.ensure_prepared`), standing in for
labelled samples a vehicle collected. With ``data = "live"`` (or ``"live+world"``) a context
whose live sample buffer (:mod:`daemon.samples`, handed over by the engine through
:meth:`MPnPBackend.use_live_samples`) holds ``min_samples`` trains on those samples (plus the
world's) and validates on the buffer's newest frames instead: its frames' stored sensor
buffers are encoded by the encoder pool when the run starts.
Which context's data (day or night) trains and validates a modality set is the context
policy's word (:meth:`policies.context.ContextPolicy.data_context`, handed over by the engine
through :meth:`MPnPBackend.use_data_context`), not something read off the modality names;
validation is on the held-out ``val`` split (never on training data). The candidate is
a *fork* of the serving state (same resident LLM, separate aligners/connections/LoRA), so
serving never sees a half-trained state; :meth:`MPnPBackend.commit_adapted` swaps the pointer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.backend import AdaptProgress, ComposeError, ComposeInput, Which, register_backend
from daemon.encoder_pool import EncoderPool
from daemon.offline_stage import OFFLINE_STAGES, load_prepared
from daemon.store import ModelStore
from mpnp.answers import ANSWER_VOCAB
from mpnp.cost_model import CostModel
from scenes.sample import Frame

log = logging.getLogger(__name__)

ANSWER_VOCABULARIES: dict[str, tuple[str, ...]] = {"nuscenes-qa": ANSWER_VOCAB, "": ()}


@dataclass
class MPnPBackendConfig:
    """Options of ``[model] options`` for the ``mpnp`` backend.

    Attributes:
        llm: LLM name or path (``smollm2-135m-instruct`` / ``embedded``: the embedded SmolLM2).
        device / dtype: where and in which precision the LLM lives.
        model_store: the model store the LLM is loaded from (``""``: ``$MPNP_HOME``), and
            the offline stage's unless ``offline_store`` is given.
        offline_store: where the offline stage's products live (world, encoders, feature
            cache, day state; ``""``: ``model_store``), e.g. the quick stage's sub-store
            (:func:`daemon.offline_stage.quick_store_dir`).
        offline_stage: what is built there if it holds no day state: ``full`` (``mpnp
            prepare``'s defaults) or ``quick`` (:meth:`adapt.prepare.PrepareConfig.quick`,
            reused only while it matches that config); see :mod:`daemon.offline_stage`.
        threads: torch CPU threads (``0``: leave torch's default).
        train_questions: cap on the runtime training questions per context (``0``: all).
        val_questions: validation questions per comparison (serving vs candidate).
        eval_chunk: validation questions per bounded call.
        max_new_tokens: answer length limit.
        answer_vocabulary: ``"nuscenes-qa"``: decoding stops as soon as an answer is one of
            the closed vocabulary's (no pass spent on the stop token: 2.3 -> 1.8 passes per
            answer on SmolLM2); ``""``: free decoding up to a stop token.
        frame_cache: encoded live frames kept (questions often ask about the same frame).
        micro_batch: training samples per bounded call; gradients accumulate until an
            optimizer step's ``batch_size`` samples are done. Smaller = shorter waits for
            questions that arrive during adaptation (the engine cannot pre-empt a call).
        learning_rates: per parameter group (over the project's fast runtime defaults).
        autocast: bfloat16 autocast of the training steps (``off`` / ``auto`` / ``bfloat16``,
            :attr:`adapt.trainer.TrainConfig.autocast`; ``""``: the project's default, the
            one Table 1 trains with).
        seed: data order, dropout and the initialisation of new aligners (a private
            stream: the process's global RNG is never reseeded).
        compose_search_questions: held-out questions per candidate of DAMC's λ search
            (taken from the validation split outside the gate's ``val_questions`` where
            it has enough).
        context: the data context (``day`` / ``night``: a split of the offline stage's
            data) of an adaptation when the context policy has no view.
    """

    llm: str = "smollm2-135m-instruct"
    device: str = "cpu"
    dtype: str = "float32"
    model_store: str = ""
    offline_store: str = ""
    offline_stage: str = "full"
    threads: int = 0
    train_questions: int = 0
    val_questions: int = 48
    eval_chunk: int = 8
    max_new_tokens: int = 4
    answer_vocabulary: str = "nuscenes-qa"
    frame_cache: int = 16
    micro_batch: int = 1
    learning_rates: dict[str, float] = field(default_factory=dict)
    autocast: str = ""
    seed: int = 0
    compose_search_questions: int = 8
    context: str = "day"

    @property
    def answer_vocabulary_answers(self) -> tuple[str, ...]:
        """The answers decoding may stop on (empty: free decoding)."""
        return ANSWER_VOCABULARIES[self.answer_vocabulary]

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"model.options.dtype must be float32/float16/bfloat16, got "
                             f"{self.dtype!r}")
        for name in ("val_questions", "eval_chunk", "max_new_tokens", "frame_cache",
                     "micro_batch", "compose_search_questions"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.options.{name} must be >= 1, got {getattr(self, name)}")
        if self.answer_vocabulary not in ANSWER_VOCABULARIES:
            raise ValueError(f"model.options.answer_vocabulary must be one of "
                             f"{sorted(ANSWER_VOCABULARIES)}, got {self.answer_vocabulary!r}")
        if self.offline_stage not in OFFLINE_STAGES:
            raise ValueError(f"model.options.offline_stage must be one of "
                             f"{list(OFFLINE_STAGES)}, got {self.offline_stage!r}")
        if self.threads < 0 or self.train_questions < 0:
            raise ValueError("model.options.threads and train_questions must be >= 0")
        from adapt.precision import AUTOCAST_MODES  # torch-free

        if self.autocast and self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"model.options.autocast must be one of {list(AUTOCAST_MODES)} "
                             f"or empty, got {self.autocast!r}")


def answer_budget(tokenizer, max_new_tokens: int, vocabulary: Sequence[str]) -> int:
    """Decoding steps per answer: at least the longest closed-vocabulary answer (as the
    model generates it, after a space) plus its stop token, so that a multi-token answer is
    never cut mid-answer (``"traffic"`` of ``"traffic cone"``) by ``max_new_tokens``."""
    if not vocabulary or tokenizer is None:
        return max_new_tokens
    longest = max(len(tokenizer.encode(" " + a, add_special_tokens=False)) for a in vocabulary)
    return max(max_new_tokens, longest + 1)


def default_data_context(modalities: frozenset[str] | Sequence[str]) -> str | None:
    """The data context of ``modalities`` by the default context policy (light level with
    its default day/night sets), used until the engine hands over its own policy's."""
    from policies.context import LightLevelPolicy

    return LightLevelPolicy().data_context(modalities)


class MPnPBackend:
    """See the module docstring; build with :func:`create_mpnp_backend`."""

    def __init__(self, config: MPnPBackendConfig, model, serving, prepared, splits) -> None:
        self.config = config
        self.model = model
        self.serving = serving  # an adapt.connectors.mpnp.MPnPConnector
        self.max_new_tokens = answer_budget(model.tokenizer, config.max_new_tokens,
                                            config.answer_vocabulary_answers)
        serving.config.max_new_tokens = self.max_new_tokens
        serving.config.stop_at_answers = config.answer_vocabulary_answers
        self.prepared = prepared
        self.splits = splits
        self.encoders = EncoderPool(prepared.encoders, config.device, config.frame_cache)
        self._job = None  # adapt.engine.AdaptationJob of the run in progress
        self._data_context: Callable[[frozenset[str]], str | None] = default_data_context
        self._live = None  # daemon.samples.LiveSamples, from the engine
        #: Where the last run's training and validation data came from (``_report``).
        self.data_info: dict[str, Any] | None = None
        self._started = 0.0
        self._names = 0
        self.last_report: dict[str, Any] | None = None
        self._composition: dict[str, Any] | None = None  # of the composed candidate
        #: Reconnects from storage (a stored state and its encoders made the serving state).
        self.reconnects: list[dict[str, Any]] = []
        # Read by the ingest thread (check_frame): computed once, never mutated.
        self._camera_shape: tuple[int, int, int] | None = None
        camera = prepared.encoders.get("camera")
        if camera is not None and hasattr(getattr(camera, "config", None), "image_height"):
            self._camera_shape = (camera.config.image_height, camera.config.image_width, 3)

    # --- input checks (the daemon's limits) -----------------------------------------------

    def check_frame(self, sensor: str, arrays: dict[str, Any]) -> str | None:
        """Why a frame cannot be encoded, or ``None``; called by the ingest thread.

        The protocol allows any camera size up to ``limits.max_image_side``, but the camera
        encoder takes exactly one: a frame of another size used to become the latest and
        fail every question paired with it until a good one came. Now it is dropped at
        ingest (``unsupported_frame``) and the last good frame keeps answering."""
        if sensor == "camera" and self._camera_shape is not None:
            shape = next(iter(arrays.values())).shape
            if tuple(shape) != self._camera_shape:
                return f"camera views {tuple(shape)}, the encoder takes {self._camera_shape}"
        return None

    def count_tokens(self, question: str) -> int:
        """Prompt tokens of ``question`` (the daemon refuses over ``max_question_tokens``)."""
        return len(self.model.tokenizer.encode(question, add_special_tokens=False))

    # --- store and encoders ---------------------------------------------------------------

    def attach_store(self, store: ModelStore) -> None:
        """Import the frozen encoders into the daemon's store; from now on they are loaded
        on demand through its memory budget (and verified against their sha256)."""
        self.encoders.attach_store(store, load=self.serving.modality_names)

    def serving_modalities(self) -> frozenset[str]:
        """What the serving state connects: the one source of truth for what is serving."""
        return frozenset(self.serving.modality_names)

    # --- serving --------------------------------------------------------------------------

    def answer(self, questions: list[str], frames: list[Frame] | None,
               modalities: frozenset[str]) -> list[str]:
        import torch

        with torch.inference_mode():
            return self.serving.answer(questions, self._serving_tokens(questions, frames,
                                                                       modalities))

    def _serving_tokens(self, questions: list[str], frames: list[Frame] | None,
                        modalities: frozenset[str]):
        """The serving state's tokens of ``frames`` (one per question), after checking that
        the engine and the serving state agree on what is served."""
        if frames is None or len(frames) != len(questions):
            raise ValueError("the mpnp backend answers about frames: one frame per question")
        connected = self.serving.modality_names
        if set(modalities) != set(connected):
            raise RuntimeError(f"the engine serves {sorted(modalities)} but the serving state "
                               f"connects {connected}")
        return self.encoders.tokens(frames, connected)

    def answer_with_confidence(self, questions: list[str], frames: list[Frame],
                               modalities: frozenset[str]) -> tuple[list[str], list[float]]:
        """:meth:`answer`, with each answer's confidence: the softmax probability of its
        first generated token (the greedy pick, so the largest), read from the logits the
        decoding computes anyway."""
        import torch

        from mpnp.generation import first_token_confidence

        with torch.inference_mode():
            out = self.serving.generate(questions, self._serving_tokens(questions, frames,
                                                                        modalities))
        return out.answers, first_token_confidence(out)

    # --- adaptation -----------------------------------------------------------------------

    def use_data_context(self, data_context: Callable[[frozenset[str]], str | None]) -> None:
        """Take the context policy's word on which context's data trains and validates a
        modality set (the engine calls this with its selector's ``data_context``)."""
        self._data_context = data_context

    def context_of(self, modalities: frozenset[str]) -> str:
        """The data context of an adaptation for ``modalities`` (the policy's, else
        ``config.context``)."""
        context = self._data_context(frozenset(modalities)) or self.config.context
        if not hasattr(self.splits, f"{context}_train"):
            raise ValueError(f"no {context!r} training data for {sorted(modalities)} (the "
                             "offline stage has day and night splits)")
        return context

    def use_live_samples(self, live) -> None:
        """Take the engine's live sample buffers (:class:`daemon.samples.LiveSamples`); its
        ``mode`` (``adaptation.data``) says whether adaptation trains on them."""
        self._live = live

    def _data(self, modalities: frozenset[str]):
        context = self.context_of(modalities)
        train = getattr(self.splits, f"{context}_train")
        val = getattr(self.splits, f"{context}_val")
        if self.config.train_questions and len(train) > self.config.train_questions:
            train = train.fraction(self.config.train_questions / len(train), self.config.seed)
        split = self._live.training_split(context) if self._live is not None else None
        self.data_info = {"source": "world", "context": context}
        if split is not None:
            from adapt.data import live_features
            from adapt.features import FeatureSet

            # The gate validates the serving state on the same questions: its sensors too.
            encoded = frozenset(modalities) | frozenset(self.serving.modality_names)
            live_train, live_val = live_features(split, self.encoders.encoder, encoded)
            if self._live.mode == "live+world":
                names = sorted(encoded)
                train = FeatureSet(train.items + live_train.items,
                                   {m: {**train.tokens[m], **live_train.tokens[m]}
                                    for m in names})
            else:
                train = live_train
            val = live_val
            sources: dict[str, int] = {}
            for item in split.train + split.val:
                sources[item.meta["source"]] = sources.get(item.meta["source"], 0) + 1
            self.data_info = {"source": self._live.mode, "context": context,
                              "live_train": len(live_train), "live_val": len(live_val),
                              "frames": len(split.frames), "sample_sources": sources}
        if len(val) > self.config.val_questions:
            val = val.fraction(self.config.val_questions / len(val), self.config.seed)
        self.data_info.update(train=len(train), val=len(val))
        return train, val

    def _new_name(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}-{self._names}"

    def train_config(self, batch_size: int):
        """The :class:`adapt.trainer.TrainConfig` of a run (what ``Trainer.fit`` would get for
        the same loop)."""
        from adapt.prepare import fast_train_config

        rates = {**fast_train_config().learning_rates, **self.config.learning_rates}
        extra = {"autocast": self.config.autocast} if self.config.autocast else {}
        return fast_train_config(batch_size=batch_size, micro_batch=self.config.micro_batch,
                                 seed=self.config.seed, learning_rates=rates, **extra)

    def start_adaptation(self, modalities: frozenset[str], n_blocks: int, steps: int,
                         batch_size: int) -> None:
        from adapt.engine import AdaptationJob, AdaptationStepper, prepare_candidate
        from adapt.recipe import ALIGNER_STATE

        if self._job is not None:
            self.discard_adapted()
        self._composition = None
        train, val = self._data(modalities)  # the context's data (before any state is made)
        specs = [self.encoders.spec(m) for m in sorted(modalities)]  # Reconnect: load them
        config = self.train_config(batch_size)
        donor = ALIGNER_STATE if ALIGNER_STATE in self.model.states else None
        candidate = prepare_candidate(self.serving, specs, self._new_name("candidate"),
                                      seed=config.seed, num_blocks=n_blocks,
                                      aligners_from=donor)
        try:
            stepper = AdaptationStepper(candidate, config, train, total_steps=steps)
        except Exception:
            self._remove_candidate(candidate)
            raise
        self._job = AdaptationJob(stepper, val, self.serving, self.config.eval_chunk)
        self._started = time.perf_counter()
        log.info("adapting %s: N=%d, %d steps of %d on %d %s questions (val %d)",
                 sorted(modalities), n_blocks, steps, batch_size, len(train),
                 self.context_of(modalities), len(val))

    def set_total_steps(self, steps: int) -> None:
        if self._job is not None:
            self._job.stepper.set_total_steps(steps)

    def adaptation_step(self) -> AdaptProgress | None:
        job = self._job
        if job is None:
            return None
        did = job.step()
        if did is None:
            return None
        s = job.stepper
        return AdaptProgress(s.steps, s.total_steps, s.loss, s.samples, did)

    def validation_accuracy(self, which: Which) -> float:
        return self._require_job().accuracy(which)

    def commit_adapted(self) -> None:
        job = self._require_job()
        old, self.serving = self.serving, job.stepper.connector
        self.last_report = self._report(job, committed=True)
        self._job = None
        self.model.activate(self.serving.state_name)
        self.model.remove_state(old.state_name)
        self.encoders.clear_tokens()

    def discard_adapted(self) -> None:
        job = self._job
        if job is None:
            return
        self.last_report = self._report(job, committed=False)
        self._job = None
        self._remove_candidate(job.stepper.connector)

    def _remove_candidate(self, candidate) -> None:
        self.model.activate(self.serving.state_name)  # before removing the active candidate
        self.model.remove_state(candidate.state_name)

    def _require_job(self):
        if self._job is None:
            raise RuntimeError("no adaptation run")
        return self._job

    def _report(self, job, committed: bool) -> dict[str, Any]:
        s = job.stepper
        accuracy = {w: v.run().accuracy for w, v in job.validations.items() if v.done}
        return {"committed": committed, "modalities": s.connector.modality_names,
                "n_blocks": s.connector.config.num_blocks, "steps": s.steps,
                "samples": s.samples, "flops": s.flops,
                "flop_counted_micro_steps": len(s.flops_by_signature),
                "micro_steps": s.micro_steps,
                "wall_s": time.perf_counter() - self._started, "loss": s.loss,
                "accuracy": accuracy, "composition": self._composition,
                "data": self.data_info}

    def progress_report(self) -> dict[str, Any] | None:
        """The running (or last) adaptation's measured figures (FLOPs, samples, time)."""
        return self._report(self._job, False) if self._job else self.last_report

    # --- states on disk -------------------------------------------------------------------

    def save_state(self, path: Path) -> None:
        """The serving state as one file (:func:`aligners.state.write_state_file`)."""
        from aligners.state import snapshot_state, write_state_file

        write_state_file(snapshot_state(self.model, self.serving.state_name, copy=False), path)

    def load_state(self, path: Path) -> None:
        """Reconnect from storage: a state written by :meth:`save_state` and its encoders
        (from the store) become the serving state."""
        from adapt.engine import PrivateRNG
        from aligners.state import install_state, read_state_file

        started = time.perf_counter()
        data = read_state_file(path)
        for modality in data.connected:
            self.encoders.encoder(modality)  # load the encoder on demand
        # install_state builds fresh modules before copying the saved tensors in: their
        # throw-away initialisation draws from a private stream, not the process's one
        with PrivateRNG(self.config.seed, self.config.device).active():
            name = install_state(self.model, data, name=self._new_name("serving"),
                                 activate=True, source=str(path))
        connector = self._connector(data, name)
        old, self.serving = self.serving, connector
        if old is not None and old.state_name in self.model.states:
            self.model.remove_state(old.state_name)
        self.encoders.clear_tokens()
        self.reconnects.append({"modalities": connector.modality_names,
                                "seconds": time.perf_counter() - started})

    def _connector(self, data, name: str):
        """A serving connector over the installed state ``name`` (made from ``data``)."""
        from adapt.connectors.base import ConnectorConfig
        from adapt.connectors.mpnp import MPnPConnector

        connected = [s for s in data.modalities if s.name in data.connected]
        return MPnPConnector(self.model.llm, self.model.tokenizer, connected,
                             ConnectorConfig(num_blocks=data.num_blocks,
                                             max_new_tokens=self.max_new_tokens,
                                             stop_at_answers=(
                                                 self.config.answer_vocabulary_answers)),
                             model=self.model, state_name=name)

    # --- composition (training-free) ------------------------------------------------------

    def compose_candidate(self, inputs: list[ComposeInput], modalities: frozenset[str],
                          method: str, max_evals: int) -> dict[str, Any]:
        """Compose stored states into the candidate (:class:`daemon.backend.ComposingBackend`).

        :func:`aligners.compose.compose_states` does the composing; DAMC's λ search scores
        each candidate through :func:`adapt.composition.validation_evaluator` on held-out
        questions of the set's context, outside the gate's questions where the split has
        enough. ``auto`` is ``damc`` when the search's questions (``max_evals`` ×
        ``compose_search_questions``) are no more than the gate's own validation (serving
        and candidate, 2 × ``val_questions``), else ``naive``. The candidate then runs as
        an :class:`adapt.engine.AdaptationJob` of zero training steps: the serving state
        and the candidate are validated chunk by chunk on the gate's questions, as after a
        training run.
        """
        from adapt.composition import validation_evaluator
        from adapt.engine import AdaptationJob, AdaptationStepper, PrivateRNG
        from aligners.compose import METHODS, CompositionError, compose_states
        from aligners.state import StateError, install_state, read_state_file

        if method not in METHODS + ("auto",):
            raise ComposeError(f"unknown composition method {method!r}; known: "
                               f"{list(METHODS) + ['auto']}")
        if self._job is not None:
            self.discard_adapted()
        started = time.perf_counter()
        try:
            states = [read_state_file(item.path) for item in inputs]
        except StateError as exc:
            raise ComposeError(str(exc)) from exc
        for modality in sorted(modalities):
            self.encoders.encoder(modality)  # Reconnect: load the encoders on demand
        train, val = self._data(modalities)
        search_val, search_on = self._search_questions(modalities, val)
        cost = max_evals * len(search_val)
        used = method if method != "auto" else (
            "damc" if cost <= 2 * len(val) else "naive")
        options: dict[str, Any] = {"name": self._new_name("composed")}
        if used == "damc":
            options.update(max_evals=max_evals, evaluate=validation_evaluator(
                self.model, search_val, batch_size=self.config.eval_chunk,
                max_new_tokens=self.max_new_tokens,
                stop_at_answers=self.config.answer_vocabulary_answers, measure_flops=False))
        read_s = time.perf_counter() - started
        # Fresh modules of the search's candidates and of the composed state initialise
        # from a private stream before the composed tensors are copied in.
        with PrivateRNG(self.config.seed, self.config.device).active():
            t0 = time.perf_counter()
            try:
                data = compose_states(states, used, **options)
            except CompositionError as exc:
                raise ComposeError(str(exc)) from exc
            compose_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                name = install_state(self.model, data, name=options["name"], activate=False)
            except StateError as exc:
                raise ComposeError(str(exc)) from exc
            install_s = time.perf_counter() - t0
        candidate = self._connector(data, name)
        try:
            stepper = AdaptationStepper(candidate, self.train_config(1), train, total_steps=0)
        except Exception:
            self._remove_candidate(candidate)
            raise
        self._job = AdaptationJob(stepper, val, self.serving, self.config.eval_chunk)
        self._started = time.perf_counter()
        info = data.config["composition"]
        search = info.get("search")
        self._composition = {
            "method": used, "lambdas": info["lambdas"], "num_blocks": data.num_blocks,
            "blocks": info["blocks"], "modality_from": info["modality_from"],
            "compose_s": compose_s, "read_s": read_s, "install_s": install_s,
            "search": None if search is None else {
                k: search[k] for k in ("evaluations", "questions", "accuracy", "wall_s",
                                       "max_evals")} | {"on": search_on},
        }
        log.info("composed %s from %s by %s (λ %s) in %.3f s (install %.3f s); validating on "
                 "%d questions", sorted(modalities), [i.name for i in inputs], used,
                 info["lambdas"], compose_s, install_s, len(val))
        return dict(self._composition)

    def _search_questions(self, modalities: frozenset[str], gate):
        """Held-out questions for DAMC's λ search: from the context's validation split
        outside the gate's questions (``gate``) when there are any, else the gate's own."""
        full = getattr(self.splits, f"{self.context_of(modalities)}_val")
        taken = {id(item) for item in gate.items}
        rest = [i for i, item in enumerate(full.items) if id(item) not in taken]
        if not rest:
            log.warning("λ search on the gate's own validation questions (the split has no "
                        "others): the gate's comparison is optimistic for the composed state")
            return gate.at_most(self.config.compose_search_questions, self.config.seed), "gate"
        return (full.subset(rest).at_most(self.config.compose_search_questions,
                                          self.config.seed), "held-out")

    # --- cost -----------------------------------------------------------------------------

    def cost_model(self) -> CostModel:
        """Per-sample analytic FLOPs (:func:`mpnp.cost_model.adaptation_cost`) for the
        planner, over every modality the store can connect."""
        from mpnp.cost_model import adaptation_cost

        specs = [self.encoders.specs[m] for m in self.encoders.modalities]
        connection = self.model.states[self.serving.state_name].config
        return adaptation_cost(self.model.llm, specs, self._text_tokens, batch=1,
                               connection=connection)

    @property
    def _text_tokens(self) -> int:
        if not hasattr(self, "_text_tokens_cache"):
            from adapt.algorithm import mean_text_tokens

            self._text_tokens_cache = mean_text_tokens(self.model.tokenizer,
                                                       self.splits.night_train)
        return self._text_tokens_cache


def create_mpnp_backend(**options: Any) -> MPnPBackend:
    """Load the LLM once (from ``model_store``), run (or reuse) the offline stage (in
    ``offline_store``, default the same store), and serve its day-camera state."""
    import torch

    from adapt.data import load_splits
    from adapt.prepare import load_day_connector
    from aligners.model import MPnPModel
    from mpnp.llm import load_llm

    config = MPnPBackendConfig(**options)
    if config.threads:
        torch.set_num_threads(config.threads)
    store = config.model_store or None
    started = time.perf_counter()
    llm, tokenizer = load_llm(config.llm, store=store, dtype=getattr(torch, config.dtype),
                              device=config.device)
    prepared = load_prepared(config.offline_store or store, llm, tokenizer,
                             stage=config.offline_stage)
    model = MPnPModel(llm, tokenizer)
    serving = load_day_connector(prepared, model)
    splits = load_splits(prepared.data_dir, prepared.encoders, prepared.feature_cache(),
                         progress=False)
    backend = MPnPBackend(config, model, serving, prepared, splits)
    log.info("mpnp backend resident in %.1fs: %s, serving %s (N=%d)",
             time.perf_counter() - started, config.llm, serving.modality_names,
             serving.config.num_blocks)
    return backend


register_backend("mpnp", create_mpnp_backend)
