"""``mpnp bench grounding``: do mPnP states read their tokens, per encoder and question type?

The cheap check that comes before Table 1 (issue "Make the sensors matter"): one mPnP state
per encoder — the ``oracle`` (ground-truth objects) and each sensor encoder in the store —
trained from scratch on the same questions of the chosen types and hops, then scored on the
validation split twice: with each question's own frame, and with another frame's tokens
(:func:`adapt.evaluate.grounding`). ``reads`` = the accuracy lost without the right frame;
a state that ignores its sensors reads ≈ 0 whatever its accuracy. Beside each row: the
question-only naive-Bayes model and the majority answer fitted on the same training types.

Scores are on the *validation* split on purpose: this benchmark is where recipes are
compared and chosen, so it must never see the test split.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapt.connectors.base import ConnectorConfig
from adapt.connectors.mpnp import MPnPConnector
from adapt.data import dataset_features, modality_specs
from adapt.evaluate import (
    EvalResult,
    evaluate,
    grounding,
    majority_baseline,
    score,
    wilson_interval,
)
from adapt.features import FeatureSet
from adapt.precision import precision_label
from adapt.prepare import FAST_LEARNING_RATES, PrepareConfig, ensure_world
from adapt.recipe import Recipe, anchor_state, with_anchor
from adapt.trainer import TrainConfig, Trainer
from aligners.anchoring import AnchorConfig
from aligners.config import ALIGNER_SPACES
from aligners.model import MPnPModel
from bench.table1 import Table1Config, _llm_name, _load_llm, add_autocast_argument
from encoders import Encoder, create_encoder, sensor_encoders
from encoders.cache import FeatureCache
from encoders.oracle import describe_scene
from encoders.pretrain import ensure_pretrained, stored_or_pretrained
from mpnp.answers import QUESTION_TYPES
from mpnp.llm import llm_fingerprint
from scenes.baselines import QuestionOnlyModel
from scenes.dataset import QADataset

log = logging.getLogger(__name__)

#: The row name of the oracle with summary tokens (:mod:`encoders.oracle`).
ORACLE_SUMMARIES = "oracle+summaries"
#: The row whose scene is *text*: each question is prefixed with the oracle's objects in
#: words (:func:`encoders.oracle.describe_scene`) and the connected tokens are all zero — what
#: the same LoRA and steps reach when the LLM reads the scene as it reads words.
ORACLE_TEXT = "oracle-text"
#: The same scene words, but the question may read them only in the connected blocks (below
#: them the words are isolated: :meth:`aligners.model.MPnPModel.isolating`) — where mPnP's
#: tokens are visible. What separates it from ``oracle-text`` is what the connected depth costs.
ORACLE_TEXT_CONNECTED = "oracle-text-connected"
SCENE_TEXT_ROWS = (ORACLE_TEXT, ORACLE_TEXT_CONNECTED)

#: Question-type filters by name; anything else is a comma list of ``type/hop`` items.
TYPE_SETS: dict[str, tuple[str, ...]] = {
    "all": tuple(f"{t}/{h}" for t in QUESTION_TYPES for h in (0, 1)),
    "H0": tuple(f"{t}/0" for t in QUESTION_TYPES),
    "H1": tuple(f"{t}/1" for t in QUESTION_TYPES),
}


def parse_types(text: str) -> tuple[str, ...]:
    """``all`` / ``H0`` / ``H1`` or ``status/0,exist/0``: the ``type/hop`` keys to keep."""
    if text in TYPE_SETS:
        return TYPE_SETS[text]
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    known = set(TYPE_SETS["all"])
    bad = [k for k in keys if k not in known]
    if not keys or bad:
        raise ValueError(f"unknown question types {bad or text!r}; use all, H0, H1 or a comma "
                         f"list of {sorted(known)}")
    return keys


@dataclass
class GroundingConfig:
    """Attributes:
        encoders: rows to run, one state each (:func:`row_encoders`): ``oracle``,
            ``oracle+summaries``, ``oracle-text``, ``oracle-text-connected``, the offline
            stage's sensor modalities and/or sensor encoder kinds (``lidar-objects``).
        types: ``type/hop`` keys of the questions trained and scored.
        night: train and score on night frames instead of day frames.
        train_questions / val_questions: sizes (a deterministic random subset; ``None``: all).
        epochs / batch_size / learning_rates: the training recipe.
        num_blocks: N of every state.
        recipe: how the states connect and start (``adapt/recipe.py``; default: the logit
            gate at α₀ 0.05 with the paper's aligners). Its text anchoring runs on the
            training frames, not for the scene-text rows.
        curve: optimizer steps after which each state is also scored on the validation
            questions (a learning curve; steps beyond the run are skipped). The row's own
            accuracy is always the end of training's.
        samples: a *runtime-samples* curve (Algorithm 1: aligners prepared offline, then
            runtime Adapt on few samples): for each k, one more state per sensor row starts
            from the row's text-anchored aligners (anchored once, before the row trained, on
            its training frames: the offline data) and trains on k of the training
            questions for ``sample_epochs`` epochs; scored on the same validation questions.
        sample_epochs: epochs of those runs (few samples need more passes).
    """

    encoders: tuple[str, ...] = ("oracle", "camera", "lidar")
    types: tuple[str, ...] = TYPE_SETS["H0"]
    night: bool = False
    train_questions: int | None = 4800
    val_questions: int | None = None
    epochs: int = 2
    batch_size: int = 16
    learning_rates: dict[str, float] = field(default_factory=lambda: dict(FAST_LEARNING_RATES))
    num_blocks: int = 12
    recipe: Recipe = field(default_factory=lambda: Recipe(gate="logit", init_alpha=0.05))
    seed: int = 0
    curve: tuple[int, ...] = ()
    samples: tuple[int, ...] = ()
    sample_epochs: int = 6

    def __post_init__(self) -> None:
        if any(s < 1 for s in self.curve):
            raise ValueError(f"curve steps must be >= 1, got {list(self.curve)}")
        self.curve = tuple(sorted(set(self.curve)))
        if any(k < 1 for k in self.samples) or self.sample_epochs < 1:
            raise ValueError(f"samples and sample_epochs must be >= 1, got "
                             f"{list(self.samples)} / {self.sample_epochs}")
        self.samples = tuple(sorted(set(self.samples)))


def _subset(data: QADataset, types: Sequence[str], n: int | None, seed: int) -> QADataset:
    wanted = set(types)
    items = [q for q in data.items if f"{q.template_type}/{q.num_hop}" in wanted]
    if n is not None and n < len(items):
        items = sorted(random.Random(seed).sample(items, n), key=lambda q: q.frame_id)
    return data.with_items(items)


def _with_scene_text(data: QADataset) -> QADataset:
    """Each question prefixed with its frame's objects in words."""
    scenes: dict[str, str] = {}
    items = []
    for q in data.items:
        if q.frame_id not in scenes:
            scenes[q.frame_id] = describe_scene(data.frame(q.frame_id))
        items.append(dataclasses.replace(q, question=f"{scenes[q.frame_id]} {q.question}"))
    return data.with_items(items)


class SceneIsolation:
    """Finds the scene words (``objects: ... .``, :func:`encoders.oracle.describe_scene`) in
    every prompt the LLM runs and isolates them in the blocks below ``first_block``.

    Works from the token ids alone (any tokenizer): each id's decoded text gives character
    offsets, and the tokens overlapping ``objects:`` up to the next ``.`` are the scene.
    Decoding steps (one new token per row) extend the mask with non-scene positions.
    """

    def __init__(self, tokenizer, first_block: int):
        self.tokenizer = tokenizer
        self.first_block = first_block
        self._pieces: dict[int, str] = {}
        self._mask: torch.Tensor | None = None

    def _piece(self, token_id: int) -> str:
        if token_id not in self._pieces:
            self._pieces[token_id] = self.tokenizer.decode([token_id])
        return self._pieces[token_id]

    def scene_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` bool: the scene's tokens in each row (a clear error if a row has none)."""
        out = torch.zeros(input_ids.shape, dtype=torch.bool)
        for row, ids in enumerate(input_ids.tolist()):
            pieces = [self._piece(i) for i in ids]
            text = "".join(pieces)
            start = text.find("objects:")
            end = text.find(".", start)
            if start < 0 or end < 0:
                raise ValueError(f"no scene words ('objects: ... .') in prompt {text!r}")
            pos = 0
            for col, piece in enumerate(pieces):
                if pos <= end and pos + len(piece) > start:
                    out[row, col] = True
                pos += len(piece)
        return out

    def _before_forward(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        if self._mask is not None and ids.shape[1] == 1:  # a decoding step
            step = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
            self._mask = torch.cat([self._mask, step], dim=1)
        else:
            self._mask = self.scene_mask(ids)

    def _provide(self, layer_idx: int) -> torch.Tensor | None:
        return self._mask if layer_idx < self.first_block else None

    @contextlib.contextmanager
    def active(self, model: MPnPModel) -> Iterator[None]:
        handle = model.llm.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        try:
            with model.isolating(self._provide):
                yield
        finally:
            handle.remove()
            self._mask = None


def row_encoders(rows: Sequence[str], prepare: PrepareConfig, world: Path, store: Path,
                 progress: bool = True, stored_encoders: bool = False) -> dict[str, Encoder]:
    """The encoder of every row, and only of those: the oracle for the diagnostic rows, the
    offline stage's encoder for a sensor modality (``camera``, ``lidar``, ...), or any
    registered sensor encoder by kind (``lidar-objects``), pretrained first where the store
    lacks it. Every name is checked before anything is pretrained, so an oracle-only run
    pretrains nothing and a typo costs nothing. With ``stored_encoders`` the store's
    encoders are used whatever config made them
    (:func:`~encoders.pretrain.stored_or_pretrained`)."""
    modalities = {**prepare.encoders, **prepare.extra_encoders}
    oracle_rows = ("oracle", ORACLE_SUMMARIES, *SCENE_TEXT_ROWS)
    unknown = [r for r in rows
               if r not in oracle_rows and r not in modalities and r not in sensor_encoders()]
    if unknown:
        raise ValueError(f"no encoder for {unknown}; rows are {list(oracle_rows)}, the "
                         f"modalities {sorted(modalities)} or encoder kinds {sensor_encoders()}")
    out: dict[str, Encoder] = {}
    for row in dict.fromkeys(rows):
        if row in oracle_rows:
            out[row] = create_encoder("oracle", summaries=row == ORACLE_SUMMARIES).freeze()
            continue
        kind = modalities.get(row, row)
        out[row] = (stored_or_pretrained(kind, world, store, progress) if stored_encoders
                    else ensure_pretrained(kind, world, store, prepare.pretrain.get(kind),
                                           progress=progress))
    return out


@dataclass
class QuestionSplits:
    """What a per-encoder question benchmark starts from (:func:`question_splits`)."""

    store: Path
    world: Path
    encoders: dict[str, Encoder]
    light: str
    train: QADataset
    val: QADataset
    baselines: dict[str, EvalResult]

    def baseline_rows(self) -> list[dict]:
        """The question-only and majority rows, as the benchmarks table them."""
        return [{"encoder": name, "accuracy": res.accuracy, "count": res.count,
                 "ci95": list(res.ci95), "per_type_hop": res.per_type_hop}
                for name, res in self.baselines.items()]


def question_splits(cfg, table: Table1Config, store_dir: str | None, progress: bool,
                    stored_encoders: bool) -> QuestionSplits:
    """The world, each row's encoder (:func:`row_encoders`), the training and validation
    questions of ``cfg``'s types and light (deterministic subsets) and, fitted on every
    training question of those types, the naive-Bayes question-only model's and the
    majority answer's validation scores. ``cfg``: any config with ``encoders``, ``types``,
    ``night``, ``train_questions``, ``val_questions`` and ``seed`` (grounding's, the
    reader's)."""
    store = table.store(store_dir)
    world = ensure_world(table.world, store, progress)
    available = row_encoders(cfg.encoders, PrepareConfig(world=table.world,
                                                         pretrain=table.pretrain),
                             world, store, progress, stored_encoders)
    light = "night" if cfg.night else "day"
    full_train = _subset(QADataset.load(world, "train").filter(night=cfg.night), cfg.types,
                         None, cfg.seed)
    train_qa = _subset(full_train, cfg.types, cfg.train_questions, cfg.seed)
    val_qa = _subset(QADataset.load(world, "val").filter(night=cfg.night), cfg.types,
                     cfg.val_questions, cfg.seed)
    if not len(train_qa) or not len(val_qa):
        raise ValueError(f"no {light} questions of types {list(cfg.types)} in {world}")
    qo = QuestionOnlyModel().fit(list(full_train.items))
    baselines = {"question-only": score(val_qa.items, qo.predict(val_qa.items)),
                 "majority": majority_baseline(full_train.items, val_qa.items)}
    return QuestionSplits(store, world, available, light, train_qa, val_qa, baselines)


def _zero_tokens(data: FeatureSet) -> FeatureSet:
    return FeatureSet(data.items, {m: {f: torch.zeros_like(t) for f, t in per.items()}
                                   for m, per in data.tokens.items()})


def run(cfg: GroundingConfig, table: Table1Config, store_dir: str | None = None,
        progress: bool = True, stored_encoders: bool = False) -> dict:
    """Train and score one state per encoder; ``table`` gives the world, encoders and LLM.
    With ``stored_encoders`` the sensor encoders are the ones the store holds, whatever
    config made them (e.g. ``mpnp encoders pretrain --slots 6``), as the probes use them."""
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    q = question_splits(cfg, table, store_dir, progress, stored_encoders)
    store, world, available, light = q.store, q.world, q.encoders, q.light
    train_qa, val_qa = q.train, q.val

    llm, tok = _load_llm(table)
    device = next(llm.parameters()).device
    model = MPnPModel(llm, tok)
    cache = FeatureCache(store / "features")
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                            learning_rates=dict(cfg.learning_rates), patience=0,
                            count_flops=False, autocast=table.autocast)
    rows = []
    for modality in cfg.encoders:
        encoders = {available[modality].modality: available[modality]}
        spec = next(iter(modality_specs(encoders).values()))
        train_rows, val_rows = train_qa, val_qa
        if modality in SCENE_TEXT_ROWS:
            train_rows, val_rows = _with_scene_text(train_qa), _with_scene_text(val_qa)
        train = dataset_features(train_rows, encoders, cache, progress=progress)
        val = dataset_features(val_rows, encoders, cache, progress=progress)
        if modality in SCENE_TEXT_ROWS:
            train, val = _zero_tokens(train), _zero_tokens(val)
        isolation = (SceneIsolation(tok, model.geometry.num_layers - cfg.num_blocks).active(model)
                     if modality == ORACLE_TEXT_CONNECTED else contextlib.nullcontext())
        conn = _connector(model, spec, cfg, table, f"grounding-{modality.replace('+', '-')}")
        anchored = None
        if modality not in SCENE_TEXT_ROWS:
            report = anchor_state(model, spec.name, available[modality], train,
                                  train_rows.frame, cfg.recipe, progress=progress,
                                  autocast=table.autocast)
            anchored = report.to_dict() if report is not None else None
        offline = ({k: v.detach().clone()
                    for k, v in model.state.aligners[spec.name].state_dict().items()}
                   if cfg.samples else None)
        curve: list[dict] = []

        def score_curve(steps: int, conn=conn, val=val, curve=curve) -> None:
            if steps in cfg.curve:
                started_eval = time.perf_counter()
                res = evaluate(conn, val)
                curve.append({"steps": steps, "accuracy": res.accuracy, "ci95": list(res.ci95),
                              "per_type_hop": res.per_type_hop,
                              "eval_s": time.perf_counter() - started_eval})
                log.info("%s after %d steps: %.3f", modality, steps, res.accuracy)

        with isolation:
            report = Trainer(conn, train_cfg).fit(train, None, progress=progress,
                                                  on_step=score_curve)
            own = evaluate(conn, val)
        state = model.state
        alphas = [round(float(state.connections.alpha(i).detach()), 3)
                  for i in state.connected_layers()]
        row = {"encoder": modality, "accuracy": own.accuracy, "count": own.count,
               "ci95": list(own.ci95), "per_type_hop": own.per_type_hop, "alphas": alphas,
               "losses": report.losses, "train_samples": report.samples,
               "steps": report.steps,
               # training time alone: the curve's evaluations ran inside the run
               "wall_s": report.wall_s - sum(p["eval_s"] for p in curve),
               "anchor": anchored}
        if curve:
            row["curve"] = curve
        if modality not in SCENE_TEXT_ROWS:  # the scene is in the question: swapping is moot
            g = grounding(conn, val, own=own, seed=cfg.seed)
            row.update(swapped_accuracy=g.swapped_accuracy,
                       swapped_ci95=list(wilson_interval(g.swapped_accuracy, g.count)),
                       reads=g.reads, changed=g.changed)
        model.remove_state(conn.state_name)
        if cfg.samples and modality not in SCENE_TEXT_ROWS:
            row["samples"] = [
                _runtime_samples_point(model, spec, cfg, table, train_cfg, train, val, k,
                                       offline)
                for k in cfg.samples if k < len(train)]
        rows.append(row)
    rows += q.baseline_rows()
    meta = {"benchmark": "grounding", "llm": llm_fingerprint(llm), "light": light,
            "split": "val", "sizes": {"train": len(train_qa), "val": len(val_qa)},
            "encoders": {m: available[m].fingerprint() for m in cfg.encoders},
            "encoder_tokens": {m: _token_summary(available[m]) for m in cfg.encoders},
            "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
            "precision": precision_label(table.autocast, device),
            "world": str(world), "total_wall_s": time.perf_counter() - started}
    return {"meta": meta, "rows": rows}


def _connector(model: MPnPModel, spec, cfg: GroundingConfig, table: Table1Config,
               state_name: str) -> MPnPConnector:
    """A fresh mPnP state ``state_name`` for ``spec`` as the run's recipe connects it."""
    return MPnPConnector(
        model.llm, model.tokenizer, [spec],
        ConnectorConfig(num_blocks=cfg.num_blocks, max_new_tokens=table.max_new_tokens),
        model=model, state_name=state_name, connection=cfg.recipe.connection(cfg.num_blocks))


def _runtime_samples_point(model: MPnPModel, spec, cfg: GroundingConfig, table: Table1Config,
                           train_cfg: TrainConfig, train: FeatureSet, val: FeatureSet, k: int,
                           offline: dict[str, torch.Tensor]) -> dict:
    """One point of the runtime-samples curve (:attr:`GroundingConfig.samples`): a fresh
    state whose aligners start as the row's offline (text-anchored) ones, trained as the
    row (``train_cfg``) but for ``cfg.sample_epochs`` epochs on ``k`` of ``train``'s
    questions, scored on ``val``."""
    conn = _connector(model, spec, cfg, table, f"grounding-samples-{k}")
    model.state.aligners[spec.name].load_state_dict(offline)
    subset = train.at_most(k, seed=cfg.seed)
    report = Trainer(conn, dataclasses.replace(train_cfg, epochs=cfg.sample_epochs)).fit(
        subset, None, progress=False)
    res = evaluate(conn, val)
    g = grounding(conn, val, own=res, seed=cfg.seed)
    model.remove_state(conn.state_name)
    log.info("%s from %d runtime samples: %.3f (reads %+.3f)", spec.name, len(subset),
             res.accuracy, g.reads)
    return {"samples": len(subset), "steps": report.steps, "accuracy": res.accuracy,
            "ci95": list(res.ci95), "per_type_hop": res.per_type_hop, "reads": g.reads,
            "wall_s": report.wall_s}


def _token_summary(encoder) -> str:
    """What an encoder's tokens are, in a few words (``camera-vit: 36 x 192, 6 object slots
    per view``)."""
    text = f"{encoder.kind}: {encoder.num_tokens} x {encoder.dim}"
    if encoder.object_slots:
        regions, count = encoder.region_layout()
        where = "for the whole scene" if count == 1 else f"per {regions[:-1]}"
        text += f", {encoder.object_slots} object slots {where}"
    return text


def _pct(value: float, ci: Sequence[float] | None = None) -> str:
    text = f"{100 * value:.1f}"
    return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else text


def _type_cells(entry: dict, keys: Sequence[str]) -> list[str]:
    """``entry``'s accuracy per ``type/hop`` key, as table cells ("—" where it has none)."""
    per = entry.get("per_type_hop") or {}
    return [f"{100 * per[k]:.1f}" if k in per else "—" for k in keys]


def to_markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    c = meta["config"]
    recipe = Recipe.from_dict(c["recipe"]) if "recipe" in c else Recipe(  # saved before recipes
        gate=c["gate"], init_alpha=c["init_alpha"], aligner_space=c.get("aligner_space", "kv"),
        block_maps=c.get("block_maps", False), anchor=c.get("anchor"))
    keys = list(c["types"])
    out = [f"# mpnp bench grounding — mPnP N={c['num_blocks']} on {_llm_name(meta)}", "",
           f"Each state trained from scratch on the same {meta['sizes']['train']} "
           f"{meta['light']} questions ({c['epochs']} epochs, batch {c['batch_size']}); "
           f"scored on {meta['sizes']['val']} "
           f"{meta['light']} validation questions of the same types. *swapped*: the same "
           "questions with another frame's tokens; *reads* = accuracy − swapped (≈ 0: the "
           "state ignores its tokens). Exact match, %, 95 % Wilson interval.", "",
           f"Recipe: {recipe.describe()}."
           + (f" Training steps in {meta['precision']}." if "precision" in meta else ""), ""]
    if meta.get("encoder_tokens"):
        out += ["Tokens: " + "; ".join(meta["encoder_tokens"].values()) + ".", ""]
    out += ["| encoder | accuracy | swapped | reads | " + " | ".join(keys) + " |",
            "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        swapped = _pct(r["swapped_accuracy"], r.get("swapped_ci95")) if "reads" in r else "—"
        reads = f"{100 * r['reads']:+.1f}" if "reads" in r else "—"
        cells = _type_cells(r, keys)
        out.append(f"| {r['encoder']} | {_pct(r['accuracy'], r['ci95'])} | {swapped} | {reads}"
                   f" | " + " | ".join(cells) + " |")
    out += ["", "Connection weights α of the connected blocks after training:", ""]
    out += [f"- {r['encoder']}: {r['alphas']}" for r in rows if "alphas" in r]
    curves = [r for r in rows if r.get("curve")]
    if curves:
        out += ["", "Learning curve (validation accuracy after so many optimizer steps of batch "
                f"{c['batch_size']}):", "",
                "| encoder | steps | accuracy | " + " | ".join(keys) + " |",
                "|---|---|---|" + "---|" * len(keys)]
        for r in curves:
            points = [*r["curve"], {"steps": r.get("steps", "end"), "accuracy": r["accuracy"],
                                    "ci95": r["ci95"], "per_type_hop": r["per_type_hop"]}]
            if len(points) > 1 and points[-2]["steps"] == points[-1]["steps"]:
                points.pop()  # the last curve point is the end of training
            for p in points:
                cells = _type_cells(p, keys)
                out.append(f"| {r['encoder']} | {p['steps']} | {_pct(p['accuracy'], p['ci95'])}"
                           f" | " + " | ".join(cells) + " |")
    sampled = [r for r in rows if r.get("samples")]
    if sampled:
        out += ["", f"Runtime samples (each state starts from the row's offline text-anchored "
                f"aligners and trains on so many questions, {c.get('sample_epochs')} epochs; "
                "*all*: the row itself):", "",
                "| encoder | samples | steps | accuracy | reads | " + " | ".join(keys) + " |",
                "|---|---|---|---|---|" + "---|" * len(keys)]
        for r in sampled:
            points = [*r["samples"], {"samples": f"all ({meta['sizes']['train']})",
                                      "steps": r["steps"], "accuracy": r["accuracy"],
                                      "ci95": r["ci95"], "reads": r.get("reads"),
                                      "per_type_hop": r["per_type_hop"]}]
            for p in points:
                cells = _type_cells(p, keys)
                reads = f"{100 * p['reads']:+.1f}" if p.get("reads") is not None else "—"
                out.append(f"| {r['encoder']} | {p['samples']} | {p['steps']} | "
                           f"{_pct(p['accuracy'], p['ci95'])} | {reads} | "
                           + " | ".join(cells) + " |")
    fits = [r for r in rows if r.get("anchor")]
    if fits:
        out += ["", "Text anchoring (normalised MSE of the tokens' keys / values against their "
                "descriptions', mean over the connected blocks):", ""]
        out += [f"- {r['encoder']}: K {r['anchor']['key_nmse']:.3f}, V "
                f"{r['anchor']['value_nmse']:.3f} on {r['anchor']['tokens']} tokens, "
                f"{r['anchor']['targets']} descriptions ({r['anchor']['target_seconds']:.0f} s"
                f" + {r['anchor']['seconds']:.0f} s)" for r in fits]
    return "\n".join(out) + "\n"


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("grounding", help="do mPnP states read their tokens? oracle and "
                             "sensor encoders, per question type, own vs swapped frames")
    p.add_argument("--quick", action="store_true", help="tiny world, encoders and LLM")
    p.add_argument("--model")
    p.add_argument("--store")
    p.add_argument("--stored-encoders", action="store_true",
                   help="use the sensor encoders the store holds, whatever config made them "
                   "(e.g. `mpnp encoders pretrain --slots 6`), instead of the defaults")
    p.add_argument("--encoders", nargs="+", default=list(GroundingConfig.encoders),
                   metavar="ROW", help="one state each: oracle, oracle+summaries, "
                   "oracle-text, oracle-text-connected, sensor modalities of the offline "
                   "stage (camera, lidar, radar) and/or sensor encoder kinds such as "
                   "lidar-objects (default: oracle camera lidar)")
    p.add_argument("--types", default="H0", type=_types_argument,
                   help="all, H0, H1 or a comma list such as status/0,exist/0 (default H0)")
    p.add_argument("--night", action="store_true", help="night frames instead of day")
    p.add_argument("--train-questions", type=int, default=GroundingConfig.train_questions)
    p.add_argument("--batch-size", type=int, default=GroundingConfig.batch_size)
    p.add_argument("--val-questions", type=int)
    p.add_argument("--epochs", type=int, default=GroundingConfig.epochs)
    p.add_argument("--num-blocks", type=int, default=GroundingConfig.num_blocks)
    p.add_argument("--aligner-space", choices=ALIGNER_SPACES, default="kv",
                   help="kv: the paper's aligners; hidden: each block projects the aligned "
                   "hidden state with its own k_proj/v_proj (default kv)")
    p.add_argument("--block-maps", action="store_true",
                   help="a head-wise identity-initialised map per connected block")
    p.add_argument("--init-alpha", type=float, default=GroundingConfig().recipe.init_alpha,
                   help="every connection's initial α with the logit gate, in (0, 1): small "
                   "starts the injection nearly closed (default %(default)s)")
    p.add_argument("--anchor", action="store_true",
                   help="text-anchored aligner pretraining before training")
    p.add_argument("--anchor-frames", type=int, default=AnchorConfig.frames)
    p.add_argument("--anchor-steps", type=int, default=AnchorConfig.steps)
    p.add_argument("--curve", type=_steps_argument, default=(),
                   help="also score every state after these optimizer steps, e.g. 150,300")
    p.add_argument("--samples", type=_counts_argument("--samples", "sample"), default=(),
                   help="a runtime-samples curve: per sensor row, states that start from its "
                   "offline anchored aligners and train on so many questions, e.g. 100,300")
    p.add_argument("--sample-epochs", type=int, default=GroundingConfig.sample_epochs,
                   help="epochs of the runtime-samples states (default %(default)s)")
    add_autocast_argument(p)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _counts_argument(flag: str, what: str):
    """An argparse type for ``flag``: a comma list of positive counts (``150,300``)."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            counts = tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes {what} counts such as 150,300, "
                                             f"got {text!r}") from None
        if not counts or min(counts) < 1:
            raise argparse.ArgumentTypeError(f"{flag} {what} counts must be >= 1, got "
                                             f"{text!r}")
        return counts

    return parse


_steps_argument = _counts_argument("--curve", "step")


def _types_argument(text: str) -> tuple[str, ...]:
    try:
        return parse_types(text)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc)) from None


def _main(args: argparse.Namespace) -> int:
    from bench.cli import write_output

    table = Table1Config.quick() if args.quick else Table1Config()
    if args.model:
        table.model = args.model
    if args.autocast:
        table.autocast = args.autocast
    if min(args.epochs, args.num_blocks, args.batch_size, args.sample_epochs) < 1:
        raise ValueError("--epochs, --num-blocks, --batch-size and --sample-epochs must be >= 1")
    for name in ("train_questions", "val_questions"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    cfg = GroundingConfig(encoders=tuple(args.encoders), types=args.types, night=args.night,
                          train_questions=args.train_questions,
                          val_questions=args.val_questions, epochs=args.epochs,
                          batch_size=args.batch_size,
                          num_blocks=args.num_blocks, curve=args.curve,
                          samples=args.samples, sample_epochs=args.sample_epochs,
                          recipe=Recipe(gate="logit", init_alpha=args.init_alpha,
                                        aligner_space=args.aligner_space,
                                        block_maps=args.block_maps,
                                        anchor=AnchorConfig(frames=args.anchor_frames,
                                                            steps=args.anchor_steps)
                                        if args.anchor else None))
    if args.quick:
        cfg = dataclasses.replace(cfg, num_blocks=min(cfg.num_blocks, 4),
                                  train_questions=min(cfg.train_questions or 64, 64),
                                  learning_rates=dict(table.learning_rates))
        cfg.recipe = with_anchor(cfg.recipe, frames=min(args.anchor_frames, 16),
                                 steps=min(args.anchor_steps, 20))
    result = run(cfg, table, args.store, progress=not args.no_progress,
                 stored_encoders=args.stored_encoders)
    md = to_markdown(result)
    print(md)
    write_output(args.json, json.dumps(result, indent=2))
    write_output(args.markdown, md)
    return 0
