"""The real model backend: a resident LLM with mPnP states, frozen encoders from the store.

Registered as ``mpnp`` (``[model] backend = "mpnp"``). It owns:

- the LLM, loaded once (:func:`mpnp.llm.load_llm`) and wrapped in an
  :class:`aligners.model.MPnPModel`; the *serving* connector is one adapted state in it;
- the frozen encoders, imported into the daemon's :class:`~daemon.store.ModelStore` and loaded
  **on demand** through its memory budget (a LiDAR encoder is not in memory until LiDAR is
  connected, and may be evicted again);
- the runtime training data of each context: the offline stage's synthetic world
  (:func:`adapt.prepare.ensure_prepared`) stands in for labelled samples a vehicle collected.
  Modality sets with LiDAR train and validate on the night split, camera-only sets on the day
  split; validation is on the held-out ``val`` split of that context (never on training data).

Adaptation is spread over bounded calls so that the engine can answer questions between them:
``baseline`` chunks (the serving state on the validation split), one optimizer step per call
(``train``), then ``validate`` chunks (the candidate). The candidate is a *fork* of the serving
state (same resident LLM, separate aligners/connections/LoRA), so serving never sees a
half-trained state; :meth:`commit_adapted` swaps the pointer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.backend import AdaptProgress, Which, register_backend
from daemon.store import EntryKind, ModelStore, StoreError
from mpnp.answers import ANSWER_VOCAB
from policies.budget import CostModel
from scenes.sample import Frame

log = logging.getLogger(__name__)

STATE_TYPE = "mpnp.daemon_state"
STATE_VERSION = 1
ANSWER_VOCABULARIES: dict[str, tuple[str, ...]] = {"nuscenes-qa": ANSWER_VOCAB, "": ()}


@dataclass
class MPnPBackendConfig:
    """Options of ``[model] options`` for the ``mpnp`` backend.

    Attributes:
        llm: LLM name or path (``smollm2-135m-instruct`` / ``embedded``: the embedded SmolLM2).
        device / dtype: where and in which precision the LLM lives.
        model_store: the offline stage's model store (``""``: ``$MPNP_HOME``).
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
        learning_rates: per parameter group (the project's fast runtime defaults).
        seed: data order.
    """

    llm: str = "smollm2-135m-instruct"
    device: str = "cpu"
    dtype: str = "float32"
    model_store: str = ""
    threads: int = 0
    train_questions: int = 0
    val_questions: int = 48
    eval_chunk: int = 8
    max_new_tokens: int = 4
    answer_vocabulary: str = "nuscenes-qa"
    frame_cache: int = 16
    micro_batch: int = 1
    learning_rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    @property
    def answer_vocabulary_answers(self) -> tuple[str, ...]:
        """The answers decoding may stop on (empty: free decoding)."""
        return ANSWER_VOCABULARIES[self.answer_vocabulary]

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"model.options.dtype must be float32/float16/bfloat16, got "
                             f"{self.dtype!r}")
        for name in ("val_questions", "eval_chunk", "max_new_tokens", "frame_cache",
                     "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.options.{name} must be >= 1, got {getattr(self, name)}")
        if self.answer_vocabulary not in ANSWER_VOCABULARIES:
            raise ValueError(f"model.options.answer_vocabulary must be one of "
                             f"{sorted(ANSWER_VOCABULARIES)}, got {self.answer_vocabulary!r}")
        if self.threads < 0 or self.train_questions < 0:
            raise ValueError("model.options.threads and train_questions must be >= 0")


def answer_budget(tokenizer, max_new_tokens: int, vocabulary: Sequence[str]) -> int:
    """Decoding steps per answer: at least the longest closed-vocabulary answer (as the
    model generates it, after a space) plus its stop token, so that a multi-token answer is
    never cut mid-answer (``"traffic"`` of ``"traffic cone"``) by ``max_new_tokens``."""
    if not vocabulary or tokenizer is None:
        return max_new_tokens
    longest = max(len(tokenizer.encode(" " + a, add_special_tokens=False)) for a in vocabulary)
    return max(max_new_tokens, longest + 1)


def context_of(modalities: frozenset[str] | Sequence[str]) -> str:
    """The driving context whose data trains a modality set: LiDAR is the night's answer."""
    return "night" if "lidar" in modalities else "day"


class _Run:
    """One adaptation run's moving parts."""

    def __init__(self, connector, optimizer, train, val, steps: int, batch_size: int, seed: int):
        self.connector = connector
        self.optimizer = optimizer
        self.params = [p for ps in connector.parameter_groups().values() for p in ps]
        self.train = train
        self.val = val
        self.total_steps = steps
        self.batch_size = batch_size
        self.seed = seed
        self.steps = 0
        self.samples = 0
        self.flops = 0.0
        self.flops_by_signature: dict[tuple, float] = {}  # see MPnPBackend._train_micro
        self.micro_steps = 0
        self.pending = 0  # samples accumulated into the current optimizer step
        self.step_loss = 0.0
        self.epoch = 0
        self.order: list[int] = []
        self.loss: float | None = None
        self.phase = "baseline"
        self.cursor = 0
        self.hits = {"serving": 0, "adapted": 0}
        self.accuracy: dict[str, float] = {}
        self.started = time.perf_counter()

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` training items of a shuffled pass (reshuffled every epoch)."""
        if len(self.train) == 0:
            raise RuntimeError("the runtime training set is empty")
        out: list[int] = []
        while len(out) < count:
            if not self.order:
                import random

                self.epoch += 1
                self.order = list(range(len(self.train)))
                random.Random(self.seed * 1000 + self.epoch).shuffle(self.order)
            out.append(self.order.pop())
        return out


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
        self._encoders = dict(prepared.encoders)  # used until a store is attached
        self._specs = {m: _spec(e) for m, e in prepared.encoders.items()}
        self.store: ModelStore | None = None
        self._frames: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._run: _Run | None = None
        self._names = 0
        self.last_report: dict[str, Any] | None = None
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
        self.store = store
        for modality, encoder in self.prepared.encoders.items():
            name = f"encoder-{modality}"
            fingerprint = encoder.fingerprint()
            try:
                if store.get(name).meta.get("fingerprint") == fingerprint:
                    continue
            except StoreError:
                pass
            header = {"kind": encoder.kind, "modality": modality,
                      "config": encoder.config_dict(), "fingerprint": fingerprint}
            tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
            from safetensors.torch import save_file

            store.put(name, EntryKind.ENCODER, lambda p, t=tensors: save_file(t, str(p)), header)
        self._encoders = {}  # drop the preparation copies: the store owns them now
        for modality in self.serving.modality_names:
            self.encoder(modality)

    def encoder(self, modality: str):
        """The frozen encoder of ``modality``, loaded on demand."""
        if self.store is None:
            return self._encoders[modality]
        entry = self.store.get(f"encoder-{modality}")
        return self.store.load(entry.name, lambda path: _load_encoder_file(path, entry.meta,
                                                                           self.config.device))

    def _tokens(self, frames: Sequence[Frame], modalities: Sequence[str]) -> dict[str, Any]:
        import torch

        out = {}
        for modality in modalities:
            rows = []
            for frame in frames:
                key = (modality, frame.frame_id)
                if key not in self._frames:
                    self._frames[key] = self.encoder(modality).encode([frame])[0]
                    while len(self._frames) > self.config.frame_cache:
                        self._frames.popitem(last=False)
                self._frames.move_to_end(key)
                rows.append(self._frames[key])
            out[modality] = torch.stack(rows)
        return out

    # --- serving --------------------------------------------------------------------------

    def answer(self, questions: list[str], frames: list[Frame] | None,
               modalities: frozenset[str]) -> list[str]:
        import torch

        if frames is None or len(frames) != len(questions):
            raise ValueError("the mpnp backend answers about frames: one frame per question")
        connected = self.serving.modality_names
        if set(modalities) != set(connected):
            log.warning("asked for %s but the serving state connects %s; using the latter",
                        sorted(modalities), connected)
        with torch.inference_mode():
            tokens = self._tokens(frames, connected)
            return self.serving.answer(questions, tokens)

    # --- adaptation -----------------------------------------------------------------------

    def _data(self, modalities: frozenset[str]):
        context = context_of(modalities)
        train = getattr(self.splits, f"{context}_train")
        val = getattr(self.splits, f"{context}_val")
        if self.config.train_questions and len(train) > self.config.train_questions:
            train = train.fraction(self.config.train_questions / len(train), self.config.seed)
        if len(val) > self.config.val_questions:
            val = val.fraction(self.config.val_questions / len(val), self.config.seed)
        return train, val

    def _new_name(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}-{self._names}"

    def start_adaptation(self, modalities: frozenset[str], n_blocks: int, steps: int,
                         batch_size: int) -> None:
        from adapt.prepare import fast_train_config
        from adapt.trainer import Trainer

        if self._run is not None:
            self.discard_adapted()
        specs = [self._spec_for(m) for m in sorted(modalities)]
        candidate = self.serving.fork(self._new_name("candidate"))
        candidate.config = dataclasses.replace(candidate.config)  # fork shares the object
        candidate.reconnect(specs)  # Select -> Reconnect (kept aligners stay trained)
        candidate.set_num_blocks(n_blocks)
        rates = {**fast_train_config().learning_rates, **self.config.learning_rates}
        # The trainer marks what trains (by structure) and builds the per-group optimizer;
        # the steps themselves are micro-batched here.
        trainer = Trainer(candidate, fast_train_config(batch_size=batch_size,
                                                       seed=self.config.seed,
                                                       learning_rates=rates,
                                                       count_flops=False))
        train, val = self._data(modalities)
        self._run = _Run(candidate, trainer.optimizer, train, val, steps, batch_size,
                         self.config.seed)
        log.info("adapting %s: N=%d, %d steps of %d on %d %s questions (val %d)",
                 sorted(modalities), n_blocks, steps, batch_size, len(train),
                 context_of(modalities), len(val))

    def _spec_for(self, modality: str):
        if modality not in self._specs:
            raise ValueError(f"no encoder for modality {modality!r}; have {sorted(self._specs)}")
        self.encoder(modality)  # Reconnect: make sure it is loaded (from the store)
        return self._specs[modality]

    def set_total_steps(self, steps: int) -> None:
        if self._run is not None:
            self._run.total_steps = max(steps, self._run.steps)

    def adaptation_step(self) -> AdaptProgress | None:
        run = self._run
        if run is None:
            return None
        did = run.phase  # progress reports the work this call did
        if run.phase == "baseline":
            if self._validate_chunk(run, "serving"):
                run.phase = "train"
        elif run.phase == "train":
            if run.steps < run.total_steps:
                self._train_micro(run)
            if run.steps >= run.total_steps:
                run.phase = "validate"
        elif run.phase == "validate":
            if self._validate_chunk(run, "adapted"):
                run.phase = "done"
        else:
            return None
        return AdaptProgress(run.steps, run.total_steps, run.loss, run.samples, did)

    def _train_micro(self, run: _Run) -> None:
        """One micro-batch forward/backward (FLOPs counted); an optimizer step once the
        accumulated samples make a full batch."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        if run.pending == 0:
            run.optimizer.zero_grad(set_to_none=True)
            run.step_loss = 0.0
        take = min(self.config.micro_batch, run.batch_size - run.pending)
        indices = run.next_indices(take)
        batch = run.train.batch(indices, run.connector.modality_names)
        run.connector.train()
        # Counting FLOPs costs as much Python time as a micro-step computes on a CPU, and
        # a question arriving meanwhile waits for it; so each distinct step shape is
        # counted once and its count reused for every later step of the same shape.
        key = run.connector.step_signature(batch)
        counted = run.flops_by_signature.get(key)
        if counted is None:
            counter = FlopCounterMode(display=False)
            with counter:
                loss = run.connector.loss(batch) * (len(indices) / run.batch_size)
                loss.backward()
            counted = run.flops_by_signature[key] = counter.get_total_flops()
        else:
            loss = run.connector.loss(batch) * (len(indices) / run.batch_size)
            loss.backward()
        run.flops += counted
        run.micro_steps += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"adaptation loss is {value} at step {run.steps + 1}")
        run.step_loss += value
        run.pending += len(indices)
        run.samples += len(indices)
        if run.pending >= run.batch_size:
            torch.nn.utils.clip_grad_norm_(run.params, 1.0)
            run.optimizer.step()
            run.steps += 1
            run.loss = run.step_loss
            run.pending = 0

    def _score(self, run: _Run, which: Which, indices: list[int]) -> int:
        """Exact-match hits of ``which`` on validation items ``indices``."""
        import torch

        from mpnp.answers import exact_match

        connector = self.serving if which == "serving" else run.connector
        batch = run.val.batch(indices, connector.modality_names)
        connector.eval()
        with torch.inference_mode():
            answers = connector.answer(batch.questions, batch.tokens)
        return sum(exact_match(a, b) for a, b in zip(answers, batch.answers))

    def _validate_chunk(self, run: _Run, which: Which) -> bool:
        """Score the next chunk of the validation split; True when the split is done."""
        end = min(run.cursor + self.config.eval_chunk, len(run.val))
        run.hits[which] += self._score(run, which, list(range(run.cursor, end)))
        run.cursor = end
        if run.cursor < len(run.val):
            return False
        run.accuracy[which] = run.hits[which] / max(len(run.val), 1)
        run.cursor = 0
        return True

    def validation_accuracy(self, which: Which) -> float:
        run = self._require_run()
        if which not in run.accuracy:  # an operator forced the end early: score it all now
            chunk = self.config.eval_chunk
            hits = sum(self._score(run, which, list(range(i, min(i + chunk, len(run.val)))))
                       for i in range(0, len(run.val), chunk))
            run.accuracy[which] = hits / max(len(run.val), 1)
        return run.accuracy[which]

    def commit_adapted(self) -> None:
        run = self._require_run()
        old = self.serving
        self.serving = run.connector
        self.last_report = self._report(run, committed=True)
        self._run = None
        self.model.activate(self.serving.state_name)
        self.model.remove_state(old.state_name)
        self._frames.clear()

    def discard_adapted(self) -> None:
        run = self._run
        if run is None:
            return
        self.last_report = self._report(run, committed=False)
        self._run = None
        self.model.activate(self.serving.state_name)  # before removing the active candidate
        self.model.remove_state(run.connector.state_name)

    def _require_run(self) -> _Run:
        if self._run is None:
            raise RuntimeError("no adaptation run")
        return self._run

    def _report(self, run: _Run, committed: bool) -> dict[str, Any]:
        return {"committed": committed, "modalities": run.connector.modality_names,
                "n_blocks": run.connector.config.num_blocks, "steps": run.steps,
                "samples": run.samples, "flops": run.flops,
                "flop_counted_micro_steps": len(run.flops_by_signature),
                "micro_steps": run.micro_steps,
                "wall_s": time.perf_counter() - run.started, "loss": run.loss,
                "accuracy": dict(run.accuracy)}

    def progress_report(self) -> dict[str, Any] | None:
        """The running (or last) adaptation's measured figures (FLOPs, samples, time)."""
        return self._report(self._run, False) if self._run else self.last_report

    # --- states on disk -------------------------------------------------------------------

    def save_state(self, path: Path) -> None:
        """The serving state's tensors + its config (safetensors metadata), one file."""
        from safetensors.torch import save_file

        from mpnp.llm import llm_fingerprint

        state = self.model.states[self.serving.state_name]
        tensors = {k: v.detach().to("cpu").contiguous()
                   for k, v in self.model.state_tensors(state.name).items()}
        config = {"num_blocks": state.config.num_blocks, "connection": state.config.to_dict(),
                  "modalities": [asdict(s) for s in state.modalities],
                  "connected": list(state.connected), "llm": llm_fingerprint(self.model.llm)}
        save_file(tensors, str(path), metadata={"type": STATE_TYPE,
                                                "format_version": str(STATE_VERSION),
                                                "config": json.dumps(config)})

    def load_state(self, path: Path) -> None:
        """Make a state written by :meth:`save_state` the serving state (Reconnect)."""
        import torch
        from safetensors import safe_open

        from adapt.connectors.base import ConnectorConfig
        from adapt.connectors.mpnp import MPnPConnector
        from aligners.config import ConnectionConfig, ModalitySpec
        from mpnp.llm import llm_fingerprint, llm_mismatch

        started = time.perf_counter()
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("type") != STATE_TYPE or meta.get("format_version") != str(STATE_VERSION):
                raise ValueError(f"{path}: not an {STATE_TYPE} v{STATE_VERSION} file")
            config = json.loads(meta["config"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        diff = llm_mismatch(llm_fingerprint(self.model.llm), config["llm"])
        if diff:
            raise ValueError(f"{path}: the state was made for another LLM (differs in "
                             f"{', '.join(diff)})")
        specs = [ModalitySpec(**m) for m in config["modalities"]]
        for spec in specs:
            if spec.name in config["connected"]:
                self.encoder(spec.name)  # load the encoder on demand
        name = self._new_name("serving")
        self.model.create_state(name, specs, ConnectionConfig.from_dict(config["connection"]),
                                connect=False, activate=False)
        try:
            expected = self.model.state_tensors(name)
            if set(expected) != set(tensors):
                raise ValueError(f"{path}: tensor set does not match its config")
            with torch.no_grad():
                for key, value in expected.items():
                    value.copy_(tensors[key].to(value.device, value.dtype))
            self.model.activate(name)
            self.model.states[name].connected = list(config["connected"])
            self.model.set_num_blocks(config["num_blocks"])
        except Exception:
            self.model.remove_state(name)
            raise
        connected = [s for s in specs if s.name in config["connected"]]
        connector = MPnPConnector(self.model.llm, self.model.tokenizer, connected,
                                  ConnectorConfig(num_blocks=config["num_blocks"],
                                                  max_new_tokens=self.max_new_tokens,
                                                  stop_at_answers=(
                                                      self.config.answer_vocabulary_answers)),
                                  model=self.model, state_name=name)
        old, self.serving = self.serving, connector
        if old is not None and old.state_name in self.model.states:
            self.model.remove_state(old.state_name)
        self._frames.clear()
        self.reconnects.append({"modalities": connector.modality_names,
                                "seconds": time.perf_counter() - started})

    # --- cost -----------------------------------------------------------------------------

    def cost_model(self) -> CostModel:
        """Per-sample analytic FLOPs (SPEC §2.7) for the planner."""
        from mpnp.cost_model import aligner_flops_per_token, analytic_step_cost
        from mpnp.llm import llm_geometry

        geometry = llm_geometry(self.model.llm)
        specs = list(self._specs.values())
        prefix = sum(s.num_tokens for s in specs)
        per_token = sum(s.num_tokens * aligner_flops_per_token(s.embed_dim, geometry.kv_width)
                        for s in specs) / max(prefix, 1)
        cost = analytic_step_cost(self.model.llm, batch=1, text_tokens=self._text_tokens,
                                  prefix_tokens=prefix, aligner_flops_per_token=per_token)
        return CostModel(forward_flops=cost.forward, llm_backward_flops=cost.dy_llm,
                         aligner_flops=cost.dw_aligners, emb_backward_flops=cost.dy_emb,
                         num_layers=cost.num_layers)

    @property
    def _text_tokens(self) -> int:
        if not hasattr(self, "_text_tokens_cache"):
            from adapt.algorithm import mean_text_tokens

            self._text_tokens_cache = mean_text_tokens(self.model.tokenizer,
                                                       self.splits.night_train)
        return self._text_tokens_cache


def _spec(encoder):
    from aligners.config import ModalitySpec

    return ModalitySpec(encoder.modality, embed_dim=encoder.dim, num_tokens=encoder.num_tokens)


def _load_encoder_file(path: Path, meta: dict[str, Any], device: str):
    """Rebuild a frozen encoder from a store entry (weights file + header in the manifest)."""
    from safetensors.torch import load_file

    from encoders import create_encoder

    encoder = create_encoder(meta["kind"], **meta["config"])
    encoder.load_state_dict(load_file(str(path)), strict=True)
    encoder.to(device)
    if encoder.fingerprint() != meta["fingerprint"]:
        raise StoreError(f"{path}: encoder weights do not match their fingerprint")
    return encoder.freeze()


def load_prepared(store: str | None, llm=None, tokenizer=None):
    """The offline stage's products: reused as they are when ``mpnp prepare`` left a day
    state (whatever configuration made it), else the offline stage runs now (default config)."""
    from adapt.prepare import DAY_STATE, RECORD_FILE, Prepared, ensure_prepared
    from encoders.base import load_encoder
    from mpnp.paths import model_store_dir

    root = model_store_dir(store)
    state_dir = root / "states" / DAY_STATE
    record_path = state_dir / RECORD_FILE
    if not record_path.is_file():
        log.warning("no offline stage in %s yet: running it now (`mpnp prepare`)", root)
        return ensure_prepared(store, llm=llm, tokenizer=tokenizer, progress=True)
    record = json.loads(record_path.read_text())
    encoders = {}
    for modality, fingerprint in record["encoders"].items():
        kind = {"camera": "camera-vit", "lidar": "lidar-rangevit"}.get(modality, modality)
        encoder = load_encoder(root / "encoders" / kind)
        if encoder.fingerprint() != fingerprint:
            raise ValueError(f"{root / 'encoders' / kind} changed since the day state was "
                             "trained; run `mpnp prepare` again")
        encoders[modality] = encoder
    return Prepared(root, Path(record["data_dir"]), encoders, state_dir, record)


def create_mpnp_backend(**options: Any) -> MPnPBackend:
    """Load the LLM once, run (or reuse) the offline stage, and serve its day-camera state."""
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
    prepared = load_prepared(store, llm, tokenizer)
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
