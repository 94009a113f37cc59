"""``mpnp bench table1``: mPnP against the baselines on the same data, side by side.

Protocol (one process, one machine, one seed):

1. the world and the frozen encoders come from the model store (:mod:`adapt.prepare`);
2. every method trains a camera model on the same day questions (the offline stage):
   that gives **Day (C)** and, unadapted, **Night (C)**. mPnP prepares one offline state
   (at ``offline_n``) as Algorithm 1 does — runtime N is elastic — so its Day/Night (C)
   cells are that state's for every N row;
3. from its day model every method adapts a *fork* on the same night questions:
   **add** (C → C+L) and **switch** (C → L), mPnP at each N of the rows;
4. the cost of each adaptation is measured: FLOPs counted by ``torch.utils.flop_counter``
   over every training step, peak memory above the resident state across fork + training
   (the fork is part of the cost: Full LLM needs a second copy of the LLM), wall time and
   samples/s; validation passes are in the wall time but not the FLOPs;
5. then the data-efficiency runs (60 / 80 % of the night questions) and the ablations of
   the paper (LoRA off, Linear aligner, fixed connections, no positional embeddings), all
   mPnP C → L at one N;
6. the floors and the ceiling: majority answer per type, the naive-Bayes question-only
   model (``question_only_nb``, trained on the same questions) next to the soft-prompt
   ``question_only`` connector, and ``mpnp_oracle`` — mPnP trained the same way on tokens of
   the ground-truth objects (:mod:`encoders.oracle`), the upper bound of the question side.

Every accuracy is printed with its 95 % Wilson interval; a per-type × hop table and a check
of the issue's targets (margins with the strongest question-only model) close the report.

``--quick`` runs the same protocol on a tiny world, tiny encoders and a tiny random LLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from adapt.algorithm import DEFAULT_NEW, runtime_adapt
from adapt.composition import validation_evaluator
from adapt.connectors import create_connector
from adapt.connectors.base import Connector, ConnectorConfig
from adapt.connectors.mpnp import MPnPConnector
from adapt.data import Splits, load_splits, modality_specs
from adapt.evaluate import (
    EvalResult,
    evaluate,
    grounding,
    majority_baseline,
    score,
    wilson_interval,
)
from adapt.features import FeatureSet
from adapt.precision import AUTOCAST_MODES, precision_label
from adapt.prepare import (
    DEFAULT_AUTOCAST,
    FAST_LEARNING_RATES,
    PrepareConfig,
    ensure_encoders,
    ensure_world,
)
from adapt.recipe import (
    ALIGNER_STATE,
    RECIPES,
    Recipe,
    anchor_state,
    pretrain_aligners,
    recipe_named,
    with_anchor,
)
from adapt.recipe import DEFAULT as DEFAULT_RECIPE
from adapt.trainer import TrainConfig, Trainer, TrainReport
from aligners.compose import compose_states
from aligners.model import MPnPModel
from aligners.state import install_state, snapshot_state
from encoders import create_encoder
from encoders.cache import FeatureCache
from encoders.pretrain import PretrainConfig
from mpnp.answers import QUESTION_TYPES
from mpnp.measure import PeakMemory, release_free_memory
from mpnp.paths import model_store_dir
from scenes.baselines import QuestionOnlyModel
from scenes.dataset import QADataset
from scenes.synthetic import WorldConfig

log = logging.getLogger(__name__)

SCENARIOS = {
    "day_c": "Day (C)",
    "night_c": "Night (C)",
    "night_c_to_cl": "Night (C → C+L)",
    "night_c_to_l": "Night (C → L)",
}
MODE_SCENARIO = {"add": "night_c_to_cl", "switch": "night_c_to_l"}
#: Training-free Night (C → C+L): the day camera state composed with the adapted LiDAR one.
COMPOSE_METHODS = ("naive", "damc")
BASELINES = ("full_llm", "promptfuse", "epalm", "question_only")
ABLATIONS: dict[str, dict] = {
    "lora_off": {"lora": False},
    "aligner_linear": {"aligner_kind": "linear"},
    "connections_fixed": {"train_connections": False},
    "no_positional": {"positional_embeddings": False},
}


@dataclass
class Table1Config:
    """The benchmark's protocol; ``quick()`` gives the CI-sized one."""

    model: str | None = None  # None: the embedded SmolLM2; "tiny"; "random-opt-1.3b"
    device: str = "cpu"
    ns: tuple[int, ...] = (4, 8, 12, 15, 20, 25)
    offline_n: int = 12
    baselines: tuple[str, ...] = BASELINES
    # Sized for a 2-core CPU: one epoch over 320 questions per stage keeps the whole table
    # (10 methods x 3 training stages + 6 studies) near an hour; Full LLM dominates it.
    day_samples: int = 320
    night_samples: int | None = 320  # None: every night training question
    val_samples: int = 40  # early-stopping validation (only used with epochs > 1)
    test_samples: int | None = 800  # per context; None: the whole test split
    oracle: bool = True  # the mpnp_oracle row (ground-truth object tokens)
    compose: bool = True  # the composed Night (C → C+L) rows (NaiveMC, DAMC)
    compose_max_evals: int = 4  # DAMC's λ search: candidates scored on night validation
    fractions: tuple[float, ...] = (0.6, 0.8)
    study_n: int | None = 12  # N of the data-efficiency and ablation runs
    epochs: int = 1
    batch_size: int = 8
    learning_rates: dict[str, float] = field(default_factory=lambda: dict(FAST_LEARNING_RATES))
    max_new_tokens: int = 6
    seed: int = 0
    autocast: str = DEFAULT_AUTOCAST  # TrainConfig.autocast of every training run
    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: dict[str, PretrainConfig | None] = field(default_factory=dict)
    #: How mPnP states connect and start (``adapt/recipe.py``): the offline stage's too.
    recipe: Recipe = field(default_factory=lambda: replace(DEFAULT_RECIPE))
    store_subdir: str = ""  # a separate store for --quick, so it never touches the real one

    @classmethod
    def quick(cls) -> Table1Config:
        small_cam = {"image_height": 32, "image_width": 56, "patch_size": 8, "embed_dim": 48,
                     "depth": 2, "num_heads": 2, "cls_blocks": 2}
        small_lidar = {"range_width": 128, "embed_dim": 48, "depth": 2, "num_heads": 2,
                       "token_blocks": 1}
        small_radar = {"hidden": 32, "embed_dim": 48, "depth": 1, "num_heads": 2}
        # the tiny world's sweep is 128 columns wide (the segmentation links neighbours)
        small_objects = {"width": 128, "max_segments": 16, "hidden": 32, "embed_dim": 48,
                         "depth": 1, "num_heads": 2}
        return cls(
            model="tiny", ns=(2, 4, 6), offline_n=4, day_samples=64, night_samples=48,
            val_samples=16, test_samples=32, study_n=4, epochs=2, batch_size=16,
            max_new_tokens=24,
            # A tiny random LLM with a character tokenizer needs larger steps to learn
            # anything in two epochs.
            learning_rates={"aligners": 1e-2, "lora": 5e-3, "connections": 1e-1, "llm": 1e-3,
                            "projection": 1e-2, "prompts": 1e-2},
            world=WorldConfig(day_frames=30, night_frames=20, frames_per_scene=5,
                              questions_per_frame=6, image_height=32, image_width=56,
                              lidar_width=128),
            # Pretrain on the tiny world itself, not the default pretraining corpus.
            pretrain={"camera-vit": PretrainConfig(epochs=1, corpus=None, encoder=small_cam),
                      "lidar-rangevit": PretrainConfig(epochs=1, corpus=None,
                                                       encoder=small_lidar),
                      "radar-pointnet": PretrainConfig(epochs=1, corpus=None,
                                                       encoder=small_radar),
                      "lidar-objects": PretrainConfig(epochs=1, corpus=None,
                                                      encoder=small_objects)},
            store_subdir="bench-quick",
        )

    def store(self, store_dir: str | None) -> Path:
        """The model store this protocol uses (a sub-store for ``--quick``)."""
        store = model_store_dir(store_dir)
        return store / self.store_subdir if self.store_subdir else store

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed,
                           learning_rates=dict(self.learning_rates), patience=1,
                           autocast=self.autocast)


def _load_llm(cfg: Table1Config):
    llm, tok = _load_llm_lazily(cfg)
    with torch.no_grad():  # page in every weight (safetensors maps them lazily), so that
        for p in llm.parameters():  # the first training run's peak memory is not inflated
            p.abs().sum()  # by the LLM's own pages arriving
    return llm, tok


def _load_llm_lazily(cfg: Table1Config):
    if cfg.model == "tiny":
        from mpnp.tiny import tiny_llm

        llm, tok = tiny_llm("llama", num_layers=8)
        return llm.to(cfg.device), tok
    from mpnp.llm import load_llm

    if cfg.model and cfg.model.startswith("random-"):
        from mpnp.tiny import random_paper_llm

        _, tok = load_llm(None)  # the embedded tokenizer; the weights are random
        return random_paper_llm(cfg.model[len("random-"):], tok, device=cfg.device), tok
    return load_llm(cfg.model, device=cfg.device)


class Table1:
    """Runs the protocol; rows accumulate in :attr:`rows`."""

    def __init__(self, cfg: Table1Config, store: Path, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.rows: list[dict] = []
        prep = PrepareConfig(world=cfg.world, pretrain=cfg.pretrain)
        world = ensure_world(cfg.world, store, progress)
        self.encoders = ensure_encoders(prep, world, store, progress)
        if cfg.oracle:
            self.encoders["oracle"] = create_encoder("oracle").freeze()
        self.specs = modality_specs(self.encoders)
        full = load_splits(world, self.encoders, FeatureCache(store / "features"),
                           progress=progress)
        s = cfg.seed
        self.data = Splits(
            day_train=full.day_train.at_most(cfg.day_samples, s),
            day_val=full.day_val.at_most(cfg.val_samples, s),
            day_test=full.day_test.at_most(cfg.test_samples, s),
            night_train=full.night_train.at_most(cfg.night_samples, s),
            night_val=full.night_val.at_most(cfg.val_samples, s),
            night_test=full.night_test.at_most(cfg.test_samples, s),
        )
        self.world = world
        self.train_cfg = cfg.train_config()
        self._frames: QADataset | None = None
        self._model: MPnPModel | None = None  # the resident mPnP model, once loaded
        self.anchoring: dict[str, dict] = {}  # text-anchoring reports by modality
        self.aligners_from: str | None = None  # the offline aligners' state, once built

    # ------------------------------------------------------------------ rows

    def _row(self, method: str, n: int | None, scenario: str, result: EvalResult,
             report: TrainReport | None, peak: int | None = None, **extra) -> dict:
        row = {
            "method": method, "N": n, "scenario": scenario, "accuracy": result.accuracy,
            "ci95": list(result.ci95), "test_questions": result.count,
            "per_type": result.per_type, "per_type_hop": result.per_type_hop,
            "adapt_flops": float(report.flops) if report else 0.0,
            "peak_mem_bytes": int(peak if peak is not None else
                                  (report.peak_mem_bytes if report else 0)),
            "wall_s": report.wall_s if report else 0.0,
            "samples_per_s": report.samples_per_s if report else 0.0,
            "train_samples": report.samples if report else 0,
            "epochs_run": report.epochs_run if report else 0,
            **extra,
        }
        self.rows.append(row)
        log.info("%s N=%s %s: accuracy %.3f, %.3g FLOPs, %.0f MB, %.0f s", method, n,
                 scenario, row["accuracy"], row["adapt_flops"], row["peak_mem_bytes"] / 2**20,
                 row["wall_s"])
        return row

    def _grounding(self, connector: Connector, test: FeatureSet, own: EvalResult) -> dict:
        """Does the state read its tokens? Its accuracy on ``test`` again with every question
        paired with another frame's tokens (:func:`adapt.evaluate.grounding`)."""
        return grounding(connector, test, own=own, seed=self.cfg.seed).to_dict()

    def _val(self, data: FeatureSet) -> FeatureSet | None:
        """Validation for early stopping; pointless (and not paid for) with one epoch."""
        return data if self.cfg.epochs > 1 else None

    def _connector_config(self, n: int) -> ConnectorConfig:
        return ConnectorConfig(num_blocks=n, max_new_tokens=self.cfg.max_new_tokens)

    def _train_day(self, connector: Connector) -> TrainReport:
        with PeakMemory(connector.device(), interval_s=0.005) as mem:
            report = Trainer(connector, self.train_cfg).fit(
                self.data.day_train, self._val(self.data.day_val), progress=self.progress)
        report.peak_mem_bytes = int(mem.peak_bytes)
        return report

    def _frame(self, frame_id: str):
        if self._frames is None:
            self._frames = QADataset.load(self.world, "train")
        return self._frames.frame(frame_id)

    def _anchor(self, modality: str) -> None:
        """Text-anchor the active state's ``modality`` aligners on the day training frames
        (when the recipe says so), before it trains."""
        report = anchor_state(self._model, modality, self.encoders[modality],
                              self.data.day_train, self._frame, self.cfg.recipe,
                              progress=self.progress, autocast=self.cfg.autocast)
        if report is not None:
            self.anchoring[modality] = report.to_dict()

    def _pretrain_aligners(self, model: MPnPModel) -> None:
        """Algorithm 1's aligners for every modality the night brings (when the recipe
        anchors): text-anchored on the day training frames in every block, so any runtime
        N starts from them (:func:`adapt.recipe.pretrain_aligners`)."""
        if self.cfg.recipe.anchor is None:
            return
        new = [m for m in DEFAULT_NEW if m in self.specs]
        self.anchoring.update({f"offline {m}": r for m, r in pretrain_aligners(
            model, self.specs, self.encoders, self.data.day_train, self._frame,
            self.cfg.recipe, model.geometry.num_layers, new, progress=self.progress,
            autocast=self.cfg.autocast).items()})
        self.aligners_from = ALIGNER_STATE

    def _adapt(self, day: Connector, mode: str, n: int | None, *, fraction: float = 1.0,
               ablation: dict | None = None) -> tuple[Connector, TrainReport, int]:
        train = self.data.night_train
        if fraction < 1.0:
            train = train.fraction(fraction, seed=self.cfg.seed)
        release_free_memory()
        tag = "-".join(ablation or ()) or str(int(fraction * 100))
        with PeakMemory(day.device(), interval_s=0.005) as mem:
            fork, report, _ = runtime_adapt(
                day, mode, self.specs, train, self._val(self.data.night_val), self.train_cfg,
                num_blocks=n, name=f"{day.kind}-{mode}-{n}-{tag}", connection_changes=ablation,
                aligners_from=self._donor(day, ablation), progress=self.progress)
        return fork, report, int(mem.peak_bytes)

    def _donor(self, day: Connector, ablation: dict | None) -> str | None:
        """The offline aligners a night adaptation starts from: mPnP only, and not for an
        ablation that changes the aligners' shape (they would not fit)."""
        shaped = {"aligner_kind", "positional_embeddings", "aligner_hidden_mult"}
        if not isinstance(day, MPnPConnector) or shaped & set(ablation or ()):
            return None
        return self.aligners_from

    def _night_rows(self, method: str, day: Connector, n: int | None, *,
                    lidar_state=None, **extra) -> None:
        """The adapted night rows; ``lidar_state(fork)`` sees the switched (LiDAR) state
        before it is dropped."""
        for mode, scenario in MODE_SCENARIO.items():
            fork, report, peak = self._adapt(day, mode, n)
            self._row(method, n, scenario, evaluate(fork, self.data.night_test), report, peak,
                      table="main", **extra)
            if mode == "switch" and lidar_state is not None:
                lidar_state(fork)
            _drop(fork)

    def run_composed(self, day: MPnPConnector, lidar: MPnPConnector, n: int) -> None:
        """Night (C → C+L) without training: the day camera state and the adapted LiDAR
        state composed (:mod:`aligners.compose`), NaiveMC and DAMC — λ searched on the night
        *validation* questions, its inference cost recorded beside the 0 training FLOPs."""
        model = day.model
        inputs = [snapshot_state(model, day.state_name), snapshot_state(model, lidar.state_name)]
        for method in COMPOSE_METHODS:
            extra = {}
            if method == "damc":
                extra = {"evaluate": validation_evaluator(
                    model, self.data.night_val, max_new_tokens=self.cfg.max_new_tokens),
                    "max_evals": self.cfg.compose_max_evals}
            started = time.perf_counter()
            composed = compose_states(inputs, method, name=f"composed-{method}-{n}", **extra)
            compose_s = time.perf_counter() - started
            name = install_state(model, composed, name=f"composed-{method}-{n}", activate=True)
            try:
                state = model.states[name]
                conn = MPnPConnector(model.llm, model.tokenizer,
                                     [s for s in state.modalities if s.name in state.connected],
                                     self._connector_config(state.config.num_blocks),
                                     model=model, state_name=name)
                result = evaluate(conn, self.data.night_test)
            finally:
                model.remove_state(name)
            search = composed.config["composition"].get("search") or {}
            self._row(f"mpnp_{method}", n, "night_c_to_cl", result, None, table="main",
                      composed_N=state.config.num_blocks, compose_s=compose_s,
                      lambdas=composed.config["composition"].get("lambdas"),
                      search_evaluations=search.get("evaluations", 0),
                      search_questions=search.get("questions", 0),
                      search_flops=search.get("inference_flops") or 0.0)

    # ------------------------------------------------------------------ methods

    def _blind_scenarios(self) -> list[tuple[str, FeatureSet, FeatureSet]]:
        """(scenario, training questions, test questions) of the sensor-free floors: the day
        questions for the camera scenarios, the night ones for the adapted ones."""
        d = self.data
        return [("day_c", d.day_train, d.day_test), ("night_c", d.day_train, d.night_test),
                ("night_c_to_cl", d.night_train, d.night_test),
                ("night_c_to_l", d.night_train, d.night_test)]

    def run_majority(self) -> None:
        for scenario, train, test in self._blind_scenarios():
            self._row("majority", None, scenario, majority_baseline(train.items, test.items),
                      None, table="main")

    def run_question_only_nb(self) -> None:
        """The naive-Bayes question-only model on the same training questions as the others."""
        models: dict[int, QuestionOnlyModel] = {}  # one fit per training set
        for scenario, train, test in self._blind_scenarios():
            if id(train) not in models:
                models[id(train)] = QuestionOnlyModel().fit(train.items)
            model = models[id(train)]
            self._row("question_only_nb", None, scenario,
                      score(test.items, model.predict(test.items)), None, table="main")

    def run_oracle(self, model: MPnPModel) -> None:
        """mPnP on ground-truth object tokens, trained like the camera state (the ceiling)."""
        cfg = self.cfg
        llm, tokenizer = model.llm, model.tokenizer
        oracle = MPnPConnector(llm, tokenizer, [self.specs["oracle"]],
                               self._connector_config(cfg.offline_n), model=model,
                               state_name="oracle",
                               connection=cfg.recipe.connection(cfg.offline_n))
        self._anchor("oracle")
        report = self._train_day(oracle)
        for scenario, test in (("day_c", self.data.day_test), ("night_c", self.data.night_test)):
            result = evaluate(oracle, test)
            extra = {"grounding": self._grounding(oracle, test, result)} \
                if scenario == "day_c" else {}
            self._row("mpnp_oracle", cfg.offline_n, scenario, result,
                      report if scenario == "day_c" else None, table="main", **extra)
        model.remove_state("oracle")
        del oracle
        gc.collect()

    def run_baseline(self, kind: str, llm, tokenizer) -> None:
        day = create_connector(kind, llm, tokenizer, [self.specs["camera"]],
                               self._connector_config(0))
        report = self._train_day(day)
        self._row(kind, None, "day_c", evaluate(day, self.data.day_test), report, table="main")
        self._row(kind, None, "night_c", evaluate(day, self.data.night_test), None,
                  table="main")
        self._night_rows(kind, day, None)
        _drop(day)

    def run_mpnp(self, model: MPnPModel) -> MPnPConnector:
        cfg = self.cfg
        llm, tokenizer = model.llm, model.tokenizer
        day = MPnPConnector(llm, tokenizer, [self.specs["camera"]],
                            self._connector_config(cfg.offline_n), model=model,
                            state_name="day", connection=cfg.recipe.connection(cfg.offline_n))
        self._anchor("camera")
        report = self._train_day(day)
        self._pretrain_aligners(model)
        day_res = evaluate(day, self.data.day_test)
        night_res = evaluate(day, self.data.night_test)
        reads = self._grounding(day, self.data.day_test, day_res)
        for n in cfg.ns:
            shared = {"offline_N": cfg.offline_n, "table": "main"}
            self._row("mpnp", n, "day_c", day_res, report, grounding=reads, **shared)
            self._row("mpnp", n, "night_c", night_res, None, **shared)
            compose = (lambda lidar, n=n: self.run_composed(day, lidar, n)) \
                if cfg.compose else None
            self._night_rows("mpnp", day, n, lidar_state=compose)
        return day

    def run_studies(self, day: MPnPConnector) -> None:
        cfg = self.cfg
        n = cfg.study_n or self.best_n()
        for fraction in cfg.fractions:
            fork, report, peak = self._adapt(day, "switch", n, fraction=fraction)
            self._row("mpnp", n, "night_c_to_l", evaluate(fork, self.data.night_test), report,
                      peak, table="data_efficiency", fraction=fraction)
            _drop(fork)
        for name, change in ABLATIONS.items():
            fork, report, peak = self._adapt(day, "switch", n, ablation=change)
            self._row("mpnp", n, "night_c_to_l", evaluate(fork, self.data.night_test), report,
                      peak, table="ablation", ablation=name)
            _drop(fork)

    def best_n(self) -> int:
        rows = [r for r in self.rows if r["method"] == "mpnp" and r["table"] == "main"
                and r["scenario"] == "night_c_to_l"]
        return max(rows, key=lambda r: r["accuracy"])["N"]


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def _drop(connector: Connector) -> None:
    if isinstance(connector, MPnPConnector) and connector.state_name in connector.model.states:
        if connector.state_name != "day":
            connector.model.remove_state(connector.state_name)
    del connector
    gc.collect()


def run(cfg: Table1Config, store_dir: str | None = None, progress: bool = True) -> dict:
    """The whole benchmark; returns the JSON document."""
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    bench = Table1(cfg, cfg.store(store_dir), progress)
    bench.run_majority()
    bench.run_question_only_nb()
    llm_b, tok = _load_llm(cfg)  # baselines: a plain LLM (mPnP's carries LoRA layers)
    for kind in cfg.baselines:
        bench.run_baseline(kind, llm_b, tok)
    del llm_b
    gc.collect()
    llm_m, tok = _load_llm(cfg)
    resident = MPnPModel(llm_m, tok)
    bench._model = resident
    if cfg.oracle:
        bench.run_oracle(resident)
    day = bench.run_mpnp(resident)
    bench.run_studies(day)
    from mpnp.llm import llm_fingerprint

    d = bench.data
    meta = {
        "benchmark": "table1", "quick": cfg.model == "tiny",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "device": _device_name(cfg.device),
                    "torch_threads": torch.get_num_threads()},
        "llm": llm_fingerprint(llm_m),
        "dataset": {"dir": str(bench.world), "sizes": {k: len(getattr(d, k)) for k in
                                                        ("day_train", "day_val", "day_test",
                                                         "night_train", "night_val",
                                                         "night_test")}},
        "encoders": {m: {"kind": e.kind, "fingerprint": e.fingerprint(), "tokens": e.num_tokens,
                         "dim": e.dim} for m, e in bench.encoders.items()},
        "seed": cfg.seed,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "best_n": bench.best_n(),
        "recipe": cfg.recipe.describe(),
        "precision": precision_label(cfg.autocast, torch.device(cfg.device)),
        "anchoring": bench.anchoring,
        "total_wall_s": time.perf_counter() - started,
    }
    result = {"meta": meta, "rows": bench.rows}
    meta["targets"] = check_targets(result)
    return result


# ---------------------------------------------------------------------- reporting

def _cell(rows: list[dict], method: str, n, scenario: str, table: str = "main") -> dict | None:
    for r in rows:
        if (r["method"], r["N"], r["scenario"], r.get("table")) == (method, n, scenario, table):
            return r
    return None


def _acc(row: dict) -> str:
    """'41.2 ± 3.4': accuracy in % and the half-width of its 95 % interval."""
    lo, hi = row.get("ci95") or wilson_interval(row["accuracy"], row.get("test_questions", 0))
    if lo != lo:  # nan: no interval known
        return f"{100 * row['accuracy']:.1f}"
    return f"{100 * row['accuracy']:.1f} ± {100 * (hi - lo) / 2:.1f}"


TYPE_HOPS = tuple(f"{t}/{h}" for t in QUESTION_TYPES for h in (0, 1))


def per_type_tables(rows: list[dict]) -> list[str]:
    """One table per scenario: accuracy per question type × hop of every main row."""
    out: list[str] = []
    for scenario, title in SCENARIOS.items():
        picked = [r for r in rows if r.get("table") == "main" and r["scenario"] == scenario]
        if not picked:
            continue
        out += [f"## Per type × hop — {title}", "",
                "| method | N | " + " | ".join(f"{k.split('/')[0]} H{k.split('/')[1]}"
                                              for k in TYPE_HOPS) + " | all |",
                "|---|---|" + "---|" * (len(TYPE_HOPS) + 1)]
        for r in picked:
            cells = [f"{100 * r['per_type_hop'][k]:.0f}" if k in r.get("per_type_hop", {})
                     else "–" for k in TYPE_HOPS]
            out.append(f"| {r['method']} | {r['N'] if r['N'] is not None else '–'} | "
                       + " | ".join(cells) + f" | {100 * r['accuracy']:.1f} |")
        out.append("")
    return out


def _best(rows: list[dict], scenario: str, match) -> dict | None:
    cands = [r for r in rows if r.get("table") == "main" and r["scenario"] == scenario
             and match(r["method"])]
    return max(cands, key=lambda r: r["accuracy"]) if cands else None


def check_targets(result: dict) -> list[dict]:
    """The accuracy and cost targets of the issue, measured: name, value, target, met.

    "Question-only" is the strongest question-only row of the scenario (soft prompts or
    naive Bayes); differences are in accuracy points."""
    rows = result["rows"]

    def qo(scenario: str):
        return _best(rows, scenario, lambda m: "question" in m)

    def mpnp(scenario: str, n=None):
        return _best(rows, scenario, lambda m: m == "mpnp") if n is None else \
            _cell(rows, "mpnp", n, scenario)

    checks: list[dict] = []

    def add(name: str, value: float | None, target: str, ok: bool | None,
            unit: str = "points") -> None:
        checks.append({"target": name, "value": round(value, 6), "unit": unit,
                       "goal": target, "met": ok})

    oracle, qday = _best(rows, "day_c", lambda m: "oracle" in m), qo("day_c")
    if oracle and qday:
        d = 100 * (oracle["accuracy"] - qday["accuracy"])
        add("oracle mPnP Day − question-only", d, ">= +25", d >= 25)
    day, night = mpnp("day_c"), mpnp("night_c")
    if day and qday:
        d = round(100 * (day["accuracy"] - qday["accuracy"]), 6)
        add("mPnP Day (C) − question-only", d, ">= +10", d >= 10)
    if day and night:
        d = 100 * (night["accuracy"] - day["accuracy"])
        add("mPnP Night (C) − Day (C)", d, "<= −8", d <= -8)
    switch, add_ = mpnp("night_c_to_l"), mpnp("night_c_to_cl")
    if switch and night and day:
        d = 100 * (switch["accuracy"] - night["accuracy"])
        add("best mPnP Night (C → L) − Night (C)", d, ">= +8", d >= 8)
        d = 100 * (switch["accuracy"] - day["accuracy"])
        add("best mPnP Night (C → L) − Day (C)", d, ">= −3", d >= -3)
    if switch and add_:
        d = 100 * (add_["accuracy"] - switch["accuracy"])
        add("best mPnP Night (C → C+L) − Night (C → L)", d, ">= −2", d >= -2)
    damc = _best(rows, "night_c_to_cl", lambda m: m == "mpnp_damc")
    if damc:
        n = damc["N"]
        adapted, lidar = mpnp("night_c_to_cl", n), mpnp("night_c_to_l", n)
        if adapted:
            d = 100 * (damc["accuracy"] - adapted["accuracy"])
            add(f"DAMC Night (C → C+L) − adapted C+L (N={n})", d, ">= −3", d >= -3)
        singles = [r for r in (night, lidar) if r]
        if singles:
            d = 100 * (damc["accuracy"] - max(r["accuracy"] for r in singles))
            add(f"DAMC Night (C → C+L) − the better single modality (N={n})", d, "> 0", d > 0)
    base = _best(rows, "night_c_to_l", lambda m: m in BASELINES and "question" not in m)
    full = _cell(rows, "full_llm", None, "night_c_to_l")
    if switch and base and full and full["adapt_flops"] and full["peak_mem_bytes"]:
        d = 100 * (switch["accuracy"] - base["accuracy"])
        rf = switch["adapt_flops"] / full["adapt_flops"]
        rm = switch["peak_mem_bytes"] / full["peak_mem_bytes"]
        add(f"best mPnP (N={switch['N']}) − best baseline ({base['method']}), Night (C → L)",
            d, ">= 0", d >= 0)
        add("its adaptation FLOPs / Full LLM's", rf, "<= 0.33", rf <= 1 / 3, unit="ratio")
        add("its peak memory / Full LLM's", rm, "<= 0.6", rm <= 0.6, unit="ratio")
    return checks


def grounding_section(rows: list[dict]) -> list[str]:
    """Day (C) accuracy with each question's own frame vs another frame's tokens."""
    picked = list({r["method"]: r for r in rows if r.get("grounding")}.values())
    if not picked:
        return []
    out = ["## Do the states read their tokens? (Day test)", "",
           "Each question answered again with another frame's tokens (a derangement of the "
           "frames): a state that reads its sensors loses accuracy, one that answers from the "
           "question alone does not.", "",
           "| method | own frame | another frame's | reads (points) | answers changed |",
           "|---|---|---|---|---|"]
    for r in picked:
        g = r["grounding"]
        lo, hi = g["swapped_ci95"]
        out.append(f"| {r['method']} | {_acc(r)} | {100 * g['swapped_accuracy']:.1f} ± "
                   f"{50 * (hi - lo):.1f} | {100 * g['reads']:+.1f} | "
                   f"{100 * g['changed']:.0f} % |")
    return out + [""]


def composition_section(rows: list[dict]) -> list[str]:
    """The composed Night (C → C+L) rows beside the adapted ones, with what composing cost."""
    composed = [r for r in rows if r.get("table") == "main"
                and r["method"] in {f"mpnp_{m}" for m in COMPOSE_METHODS}]
    if not composed:
        return []
    out = ["## Composition: Night (C → C+L) without training", "",
           "The day camera state composed with the adapted LiDAR state of the same N "
           "(NaiveMC: mean ΔW; DAMC: Σ λ_m ΔW_m, λ searched on night validation questions). "
           "0 training FLOPs; the search's inference cost is listed.", "",
           "| N | method | accuracy | λ | search: candidates / questions / TFLOPs | compose s "
           "| adapted C+L | C → L |", "|---|---|---|---|---|---|---|---|"]
    for r in composed:
        adapted = _cell(rows, "mpnp", r["N"], "night_c_to_cl")
        lidar = _cell(rows, "mpnp", r["N"], "night_c_to_l")
        lams = ", ".join(f"{x:g}" for x in r.get("lambdas") or []) or "–"
        search = (f"{r['search_evaluations']} / {r['search_questions']} / "
                  f"{r['search_flops'] / 1e12:.3f}" if r.get("search_evaluations") else "–")
        out.append(f"| {r['N']} | {r['method'][len('mpnp_'):]} | {_acc(r)} | {lams} | {search} "
                   f"| {r['compose_s']:.2f} | {_acc(adapted) if adapted else '–'} | "
                   f"{_acc(lidar) if lidar else '–'} |")
    return out + [""]


def targets_section(result: dict) -> list[str]:
    checks = check_targets(result)
    if not checks:
        return []
    out = ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for c in checks:
        value = f"{c['value']:.2f}" if c.get("unit") == "ratio" else f"{c['value']:+.1f}"
        out.append(f"| {c['target']} | {value} | {c['goal']} | {'yes' if c['met'] else 'no'} |")
    return out + ["", "Differences inside the rows' 95 % intervals are not results.", ""]


def _llm_name(meta: dict) -> str:
    llm = meta["llm"]
    name = Path(llm.get("name") or "").name or "tiny random"
    return f"{name} ({llm['model_type']}, {llm['num_layers']} blocks)"


def to_markdown(result: dict) -> str:
    rows, meta = result["rows"], result["meta"]
    sizes = meta["dataset"]["sizes"]
    out = [
        f"# mpnp bench table1 — {_llm_name(meta)} on {meta['machine']['device']}",
        "",
        f"Questions: day train {sizes['day_train']}, night train {sizes['night_train']}, "
        f"day test {sizes['day_test']}, night test {sizes['night_test']}; "
        f"{meta['config']['epochs']} epoch(s) (early stop on validation when > 1), batch "
        f"{meta['config']['batch_size']}, seed {meta['seed']}. Adaptation cost = the "
        "Night (C → L) run: FLOPs counted, peak memory above the resident state, wall time.",
        "",
        f"mPnP recipe: {meta.get('recipe', 'gate scale, the paper K/V aligners')}."
        + (f" Training steps in {meta['precision']}." if "precision" in meta else ""),
        "",
        "| method | N | Day (C) | Night (C) | Night (C → C+L) | Night (C → L) | adapt TFLOPs "
        "| vs Full LLM | peak MB | vs Full LLM | wall s | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = _cell(rows, "full_llm", None, "night_c_to_l")
    keys = list(dict.fromkeys((r["method"], r["N"]) for r in rows if r.get("table") == "main"))
    for method, n in keys:
        cells = [_cell(rows, method, n, s) for s in SCENARIOS]
        acc = [_acc(c) if c else "–" for c in cells]
        cost = cells[3]
        if cost and cost["adapt_flops"]:
            tf = cost["adapt_flops"] / 1e12
            rf = f"{cost['adapt_flops'] / full['adapt_flops']:.2f}" if full else "–"
            mb = cost["peak_mem_bytes"] / 2**20
            rm = f"{cost['peak_mem_bytes'] / max(full['peak_mem_bytes'], 1):.2f}" if full else "–"
            tail = [f"{tf:.2f}", rf, f"{mb:.0f}", rm, f"{cost['wall_s']:.0f}",
                    f"{cost['samples_per_s']:.1f}"]
        else:
            tail = ["–"] * 6
        out.append(f"| {method} | {n if n is not None else '–'} | " + " | ".join(acc + tail)
                   + " |")
    out += ["", "Accuracy in % ± the half-width of its 95 % Wilson interval. mPnP Day (C) / "
            f"Night (C): the one offline state (N={meta['config']['offline_n']}) — runtime N is "
            "elastic. `question_only_nb` is the naive-Bayes question-only model, "
            "`mpnp_oracle` mPnP on ground-truth object tokens (the ceiling).", ""]
    out += grounding_section(rows)
    out += composition_section(rows)
    out += per_type_tables(rows)
    out += targets_section(result)
    de = [r for r in rows if r.get("table") == "data_efficiency"]
    if de:
        n = de[0]["N"]
        main = _cell(rows, "mpnp", n, "night_c_to_l")
        out += [f"## Data efficiency (mPnP N={n}, Night (C → L))", "",
                "| night training samples | accuracy | adapt TFLOPs |", "|---|---|---|"]
        for r in sorted(de, key=lambda r: r["fraction"]) + ([main] if main else []):
            frac = r.get("fraction", 1.0)
            out.append(f"| {100 * frac:.0f} % | {100 * r['accuracy']:.1f} | "
                       f"{r['adapt_flops'] / 1e12:.2f} |")
        out.append("")
    ab = [r for r in rows if r.get("table") == "ablation"]
    if ab:
        n = ab[0]["N"]
        main = _cell(rows, "mpnp", n, "night_c_to_l")
        out += [f"## Ablations (mPnP N={n}, Night (C → L))", "", "| variant | accuracy |",
                "|---|---|"]
        if main:
            out.append(f"| full method | {100 * main['accuracy']:.1f} |")
        for r in ab:
            out.append(f"| {r['ablation']} | {100 * r['accuracy']:.1f} |")
        out.append("")
    out.append(f"Best mPnP N on Night (C → L): {meta['best_n']}. Total wall time "
               f"{meta['total_wall_s'] / 60:.1f} min.")
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    """Night (C → L) accuracy against adaptation FLOPs for every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("table") == "main"
            and r["scenario"] == "night_c_to_l" and r["adapt_flops"] > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mpnp = sorted((r for r in rows if r["method"] == "mpnp"), key=lambda r: r["adapt_flops"])
    if mpnp:
        ax.plot([r["adapt_flops"] / 1e12 for r in mpnp], [100 * r["accuracy"] for r in mpnp],
                "o-", color="tab:red", label="mPnP (N labelled)")
        for r in mpnp:
            ax.annotate(f"N={r['N']}", (r["adapt_flops"] / 1e12, 100 * r["accuracy"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    markers = {"full_llm": "s", "promptfuse": "^", "epalm": "D", "question_only": "x"}
    for r in rows:
        if r["method"] != "mpnp":
            ax.plot(r["adapt_flops"] / 1e12, 100 * r["accuracy"], markers.get(r["method"], "o"),
                    label=r["method"], markersize=8)
    maj = _cell(result["rows"], "majority", None, "night_c_to_l")
    if maj:
        ax.axhline(100 * maj["accuracy"], color="grey", ls="--", lw=1, label="majority")
    ax.set_xlabel("adaptation FLOPs (TFLOPs, measured)")
    ax.set_ylabel("Night (C → L) accuracy (%)")
    ax.set_title(f"Night (C → L) after runtime adaptation — {_llm_name(result['meta'])}",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- CLI

def _ints(text: str) -> tuple[int, ...]:
    from bench.cli import _ints as parse

    return parse(text)


def add_autocast_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autocast", choices=AUTOCAST_MODES,
                   help="bfloat16 autocast of the training steps: auto = where the device "
                   f"has bfloat16 matrix units (default: {DEFAULT_AUTOCAST})")


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("table1", help="mPnP vs Full LLM / PromptFuse / eP-ALM (Table 1)")
    p.add_argument("--quick", action="store_true",
                   help="tiny world, encoders and LLM (CI-sized, a few minutes)")
    p.add_argument("--model", help="LLM directory or .gguf (default: embedded SmolLM2)")
    p.add_argument("--store", help="model store (default: $MPNP_HOME or ~/.cache/mpnp)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--ns", type=_ints, help="mPnP N values of the rows (default 4,8,12,15,20,25)")
    p.add_argument("--methods", type=lambda t: tuple(x for x in t.split(",") if x),
                   help=f"baselines to run (default {','.join(BASELINES)}; empty: none)")
    p.add_argument("--json", type=Path, help="write the result JSON here")
    p.add_argument("--markdown", type=Path, help="write the Markdown tables here")
    p.add_argument("--plot", type=Path, help="write the accuracy-vs-FLOPs PNG here")
    p.add_argument("--day-samples", type=int, help="day training questions per method")
    p.add_argument("--night-samples", type=int,
                   help="night training questions per adaptation (0: all of them)")
    p.add_argument("--test-samples", type=int, help="test questions per context")
    p.add_argument("--epochs", type=int, help="training epochs (early stop on val when > 1)")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="how mPnP states connect and start (adapt/recipe.py; default: the "
                   "project's)")
    add_autocast_argument(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def config_from_args(args: argparse.Namespace) -> Table1Config:
    """The protocol ``mpnp bench table1`` runs for these command-line options."""
    cfg = Table1Config.quick() if args.quick else Table1Config()
    if args.model:
        cfg.model = args.model
    cfg.device = args.device
    for name in ("day_samples", "night_samples", "test_samples", "epochs"):
        value = getattr(args, name)
        if value is None:
            continue
        least = 0 if name == "night_samples" else 1
        if value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
        setattr(cfg, name, value or None)
    if args.ns:
        cfg.ns = args.ns
        if cfg.study_n not in args.ns:
            cfg.study_n = args.ns[0]
    if args.methods is not None:
        unknown = sorted(set(args.methods) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(BASELINES)}")
        cfg.baselines = args.methods
    if getattr(args, "autocast", None):
        cfg.autocast = args.autocast
    if getattr(args, "recipe", None):
        cfg.recipe = recipe_named(args.recipe)
        if args.quick:  # the tiny world has few frames
            cfg.recipe = with_anchor(cfg.recipe, frames=16, steps=20)
    return cfg


def _main(args: argparse.Namespace) -> int:
    from bench.cli import write_output

    cfg = config_from_args(args)
    result = run(cfg, args.store, progress=not args.no_progress)
    markdown = to_markdown(result)
    print(markdown)
    write_output(args.json, json.dumps(result, indent=2))
    write_output(args.markdown, markdown)
    if args.plot:
        plot(result, args.plot)
    return 0
