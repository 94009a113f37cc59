"""``mpnp bench reader``: can a small model answer the questions from an encoder's tokens?

The linear probes (:mod:`encoders.probe`) ask whether one region's tokens name its objects;
the questions ask about the whole scene ("How many parked cars are there?", "What status is
the bus?"), which needs every object's class *and* status at once. This benchmark is the
question-level check that costs minutes instead of an LLM run: a small transformer (no LLM)
reads the question's words and the frame's frozen tokens together and picks the answer,
trained from scratch per encoder on the same questions as ``mpnp bench grounding``. Scored
on the validation split with each question's own frame and with another frame's tokens
(*reads*, as in :func:`adapt.evaluate.grounding`), beside the same reader with its tokens
zeroed (a question-only model of the same capacity), the naive-Bayes question-only model
and the majority answer.

What it says: how much of each question type the tokens *carry in a readable form*. A row
that reads here but not through the LLM points at the connection recipe; a row that does
not read here will not read through the LLM either.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from adapt.data import dataset_features
from adapt.evaluate import score, wilson_interval
from adapt.features import FeatureSet
from bench.grounding import (
    SCENE_TEXT_ROWS,
    TYPE_SETS,
    _pct,
    _token_summary,
    _type_cells,
    _types_argument,
    question_splits,
)
from bench.table1 import Table1Config
from encoders.cache import FeatureCache

log = logging.getLogger(__name__)

#: The reader with every token zeroed: what the same model gets from the question alone.
NO_TOKENS = "reader, no tokens"


@dataclass
class ReaderConfig:
    """Attributes:
        encoders: rows, as ``mpnp bench grounding`` names them (:func:`row_encoders`;
            the scene-text rows have no tokens and are refused).
        types / night / train_questions / val_questions: the questions, as grounding's.
        width / layers / heads: the reader transformer.
        epochs / batch_size / lr / weight_decay: AdamW training, the same for every row.
        seed: initialisation, batch order and question subsets.
    """

    encoders: tuple[str, ...] = ("oracle", "camera", "lidar")
    types: tuple[str, ...] = TYPE_SETS["H0"]
    night: bool = False
    train_questions: int | None = 20000
    val_questions: int | None = None
    width: int = 64
    layers: int = 2
    heads: int = 4
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReaderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        scene_text = [e for e in self.encoders if e in SCENE_TEXT_ROWS]
        if scene_text:
            raise ValueError(f"{scene_text}: scene-text rows have no tokens to read")
        for name in ("train_questions", "val_questions"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ReaderConfig.{name} must be >= 1, got {value}")


def question_words(question: str) -> list[str]:
    """Lower-case words and numbers of a question (the templates need nothing finer)."""
    return re.findall(r"[a-z0-9]+", question.lower())


class QuestionReader(nn.Module):
    """A transformer over ``[answer query] + question words + scene tokens``; the query's
    output picks one of the training answers.

    Scene tokens are standardised per dimension with the training frames' statistics
    (encoders differ in scale by orders of magnitude), projected to ``width`` and given a
    learned embedding of their index (token order is the encoder's: regions, slots)."""

    def __init__(self, vocab: Sequence[str], answers: Sequence[str], num_tokens: int,
                 dim: int, mean: torch.Tensor, std: torch.Tensor, cfg: ReaderConfig,
                 max_words: int):
        super().__init__()
        self.vocab = {w: i + 1 for i, w in enumerate(vocab)}  # 0: padding / unknown word
        self.answers = list(answers)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.words = nn.Embedding(len(vocab) + 1, cfg.width, padding_idx=0)
        self.word_pos = nn.Parameter(torch.randn(max_words, cfg.width) * 0.02)
        self.token_in = nn.Linear(dim, cfg.width)
        self.token_pos = nn.Parameter(torch.randn(num_tokens, cfg.width) * 0.02)
        self.query = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 2 * cfg.width, dropout=0.1,
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, len(answers)))

    def encode_questions(self, questions: Sequence[str]) -> torch.Tensor:
        """``(Q, max_words)`` word ids, 0-padded (unknown words are 0 too)."""
        rows = [[self.vocab.get(w, 0) for w in question_words(q)][:self.word_pos.shape[0]]
                for q in questions]
        out = torch.zeros(len(rows), self.word_pos.shape[0], dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def forward(self, word_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, answers)`` logits from ``(B, max_words)`` word ids and ``(B, T, D)`` tokens."""
        b = word_ids.shape[0]
        words = self.words(word_ids) + self.word_pos
        scene = self.token_in((tokens - self.mean) / self.std) + self.token_pos
        x = torch.cat([self.query.expand(b, -1, -1), words, scene], dim=1)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool), word_ids == 0,
                         torch.zeros(b, scene.shape[1], dtype=torch.bool)], dim=1)
        return self.head(self.body(x, src_key_padding_mask=pad)[:, 0])


def _stacked(data: FeatureSet, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item's frame tokens as one ``(F, T, D)`` tensor and each item's row in it."""
    frames = sorted({it.frame_id for it in data.items})
    row = {f: i for i, f in enumerate(frames)}
    table = torch.stack([data.tokens[modality][f].float() for f in frames])
    return table, torch.tensor([row[it.frame_id] for it in data.items], dtype=torch.long)


def _predict(model: QuestionReader, words: torch.Tensor, table: torch.Tensor,
             rows: torch.Tensor, batch_size: int = 256) -> list[str]:
    model.eval()
    out: list[str] = []
    with torch.no_grad():
        for lo in range(0, len(rows), batch_size):
            logits = model(words[lo:lo + batch_size], table[rows[lo:lo + batch_size]])
            out += [model.answers[i] for i in logits.argmax(-1).tolist()]
    return out


def train_reader(train: FeatureSet, modality: str, cfg: ReaderConfig, *,
                 zero_tokens: bool = False, progress: bool = True
                 ) -> tuple[QuestionReader, dict]:
    """Fit a :class:`QuestionReader` on ``train``'s questions and ``modality``'s tokens
    (``zero_tokens``: every token zero, the question-only control)."""
    torch.manual_seed(cfg.seed)
    table, rows = _stacked(train, modality)
    if zero_tokens:
        table = torch.zeros_like(table)
    flat = table.flatten(0, 1)
    mean, std = flat.mean(0), flat.std(0).clamp(min=1e-3)
    vocab = sorted({w for it in train.items for w in question_words(it.question)})
    answers = sorted({it.answer for it in train.items})
    max_words = max(len(question_words(it.question)) for it in train.items) + 2
    model = QuestionReader(vocab, answers, table.shape[1], table.shape[2], mean, std, cfg,
                           max_words)
    words = model.encode_questions([it.question for it in train.items])
    answer_row = {a: i for i, a in enumerate(answers)}
    target = torch.tensor([answer_row[it.answer] for it in train.items], dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                pct_start=0.1)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc=f"reader {modality}{' (no tokens)' if zero_tokens else ''}",
               unit="step", disable=not progress)
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(rows), generator=generator)
        running = 0.0
        for lo in range(0, len(order), cfg.batch_size):
            pick = order[lo:lo + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(words[pick], table[rows[pick]]),
                                               target[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(pick)
            bar.update(1)
        losses.append(running / len(rows))
        log.info("reader %s epoch %d: loss %.4f", modality, len(losses), losses[-1])
    bar.close()
    return model, {"losses": [round(x, 4) for x in losses], "steps": total,
                   "wall_s": time.perf_counter() - started}


def score_reader(model: QuestionReader, data: FeatureSet, modality: str, *,
                 zero_tokens: bool = False, seed: int = 0) -> dict:
    """Accuracy on ``data`` with each question's own frame and (unless ``zero_tokens``) with
    another frame's tokens."""
    words = model.encode_questions([it.question for it in data.items])

    def run(features: FeatureSet) -> list[str]:
        table, rows = _stacked(features, modality)
        return _predict(model, words, torch.zeros_like(table) if zero_tokens else table, rows)

    own = score(data.items, run(data))
    out = {"accuracy": own.accuracy, "count": own.count, "ci95": list(own.ci95),
           "per_type_hop": own.per_type_hop}
    if not zero_tokens:
        swapped = score(data.items, run(data.with_swapped_frames(seed)))
        out.update(swapped_accuracy=swapped.accuracy,
                   swapped_ci95=list(wilson_interval(swapped.accuracy, swapped.count)),
                   reads=own.accuracy - swapped.accuracy)
    return out


def run(cfg: ReaderConfig, table: Table1Config, store_dir: str | None = None,
        progress: bool = True, stored_encoders: bool = False) -> dict:
    """One reader per row, the no-token reader and the question-only baselines."""
    started = time.perf_counter()
    q = question_splits(cfg, table, store_dir, progress, stored_encoders)
    train_qa, val_qa, available = q.train, q.val, q.encoders
    cache = FeatureCache(q.store / "features")
    rows: list[dict] = []
    control: dict = {}
    for name in cfg.encoders:
        encoder = available[name]
        encoders = {encoder.modality: encoder}
        train = dataset_features(train_qa, encoders, cache, progress=progress)
        val = dataset_features(val_qa, encoders, cache, progress=progress)
        # The no-token control once, on the first row's shapes (its tokens are all zero).
        for zero in (False, True) if not control else (False,):
            model, fit = train_reader(train, encoder.modality, cfg, zero_tokens=zero,
                                      progress=progress)
            row = {"encoder": NO_TOKENS if zero else name, **fit,
                   **score_reader(model, val, encoder.modality, zero_tokens=zero,
                                  seed=cfg.seed)}
            log.info("reader %s: %.3f", row["encoder"], row["accuracy"])
            if zero:
                control = row
            else:
                rows.append(row)
    rows += [control, *q.baseline_rows()]
    meta = {"benchmark": "reader", "light": q.light, "split": "val",
            "sizes": {"train": len(train_qa), "val": len(val_qa),
                      "train_frames": len({q.frame_id for q in train_qa.items})},
            "encoders": {m: available[m].fingerprint() for m in cfg.encoders},
            "encoder_tokens": {m: _token_summary(available[m]) for m in cfg.encoders},
            "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
            "world": str(q.world), "total_wall_s": time.perf_counter() - started}
    return {"meta": meta, "rows": rows}


def to_markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    c = meta["config"]
    keys = list(c["types"])
    out = ["# mpnp bench reader — can a small model answer from the tokens?", "",
           f"A {c['layers']}-layer transformer (width {c['width']}, no LLM) reads each "
           "question's words and its frame's frozen tokens; trained from scratch per row on "
           f"the same {meta['sizes']['train']} {meta['light']} questions "
           f"({meta['sizes'].get('train_frames', '?')} frames, {c['epochs']} epochs), scored "
           f"on {meta['sizes']['val']} {meta['light']} validation questions. *swapped*: "
           "another frame's tokens; *reads* = accuracy − swapped. "
           f"*{NO_TOKENS}*: the same reader with every token zero. Exact match, %, 95 % "
           "Wilson interval.", ""]
    if meta.get("encoder_tokens"):
        out += ["Tokens: " + "; ".join(meta["encoder_tokens"].values()) + ".", ""]
    out += ["| row | accuracy | swapped | reads | " + " | ".join(keys) + " |",
            "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        swapped = _pct(r["swapped_accuracy"], r.get("swapped_ci95")) if "reads" in r else "—"
        reads = f"{100 * r['reads']:+.1f}" if "reads" in r else "—"
        out.append(f"| {r['encoder']} | {_pct(r['accuracy'], r['ci95'])} | {swapped} | "
                   f"{reads} | " + " | ".join(_type_cells(r, keys)) + " |")
    timed = [r for r in rows if "wall_s" in r]
    out += ["", "Training time: " + ", ".join(f"{r['encoder']} {r['wall_s']:.0f} s"
                                              for r in timed) + "."]
    return "\n".join(out) + "\n"


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("reader", help="can a small model (no LLM) answer the questions "
                             "from each encoder's tokens? minutes, before an LLM run")
    p.add_argument("--quick", action="store_true", help="tiny world and encoders")
    p.add_argument("--store")
    p.add_argument("--stored-encoders", action="store_true",
                   help="use the sensor encoders the store holds, whatever config made them")
    p.add_argument("--encoders", nargs="+", default=list(ReaderConfig.encoders), metavar="ROW",
                   help="rows as in `mpnp bench grounding` (oracle, oracle+summaries, sensor "
                   "modalities, encoder kinds such as lidar-objects)")
    p.add_argument("--types", default="H0", type=_types_argument,
                   help="all, H0, H1 or a comma list such as status/0,exist/0 (default H0)")
    p.add_argument("--night", action="store_true", help="night frames instead of day")
    p.add_argument("--train-questions", type=int, default=ReaderConfig.train_questions)
    p.add_argument("--val-questions", type=int)
    p.add_argument("--epochs", type=int, default=ReaderConfig.epochs)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from bench.cli import write_output

    table = Table1Config.quick() if args.quick else Table1Config()
    cfg = ReaderConfig(encoders=tuple(args.encoders), types=args.types, night=args.night,
                       train_questions=args.train_questions, val_questions=args.val_questions,
                       epochs=args.epochs)
    if args.quick:
        cfg = dataclasses.replace(cfg, train_questions=min(cfg.train_questions or 256, 256),
                                  epochs=20, width=32, layers=1)
    result = run(cfg, table, args.store, progress=not args.no_progress,
                 stored_encoders=args.stored_encoders)
    md = to_markdown(result)
    print(md)
    write_output(args.json, json.dumps(result, indent=2))
    write_output(args.markdown, md)
    return 0
