"""``mpnp bench live-samples``: can a LiDAR state learn from what the vehicle saw at night?

Issue 14's measurement. A simulated night drive — the world's night *training* frames in
scene order, re-stamped one every 0.5 s — is turned into live samples exactly as the daemon
does (:mod:`daemon.teaching`, :mod:`daemon.samples`), then three LiDAR states are trained the
same way (mPnP, same N, seed, epochs, learning rates) and tested on the **same** night test
questions:

- ``labelled``: on the world's labelled night training split (what the daemon's default,
  ``adaptation.data = "world"``, trains on), as many questions as the live arm has;
- ``live objects``: only on samples generated from each drive frame's object list (here the
  world's ground-truth boxes, sent through the wire schema and its validation: a perfect
  perception stack — real detections would be noisier), stored in the on-disk buffer and
  read back, the buffer's held-out time slice (the newest frames) as its validation;
- ``pseudo``: only on camera-teacher pseudo-labels: a camera state trained on day questions
  answers the daemon's scene-free template questions about the same drive frames (their
  stored camera views), each answer stored with its first-token confidence.

The JSON's top-level ``ratio`` is live-objects ÷ labelled accuracy (the issue's target is
≥ 0.9). The live samples' frames are encoded from their *stored* sensor buffers with the daemon
backend's own function (:func:`adapt.data.live_features`), not from the world's feature cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapt.connectors.base import ConnectorConfig
from adapt.connectors.mpnp import MPnPConnector
from adapt.data import live_features
from adapt.evaluate import evaluate, majority_baseline, wilson_interval
from adapt.features import FeatureSet
from adapt.trainer import Trainer
from aligners.config import ConnectionConfig
from aligners.model import MPnPModel
from bench.table1 import Table1, Table1Config, _llm_name, _load_llm
from daemon.samples import LiveSamples
from daemon.teaching import (
    object_samples,
    objects_to_wire,
    parse_objects,
    samples_from_candidates,
    scene_free_questions,
)
from mpnp.generation import first_token_confidence
from mpnp.llm import llm_fingerprint
from scenes.dataset import QADataset
from scenes.questions import AnswerBalancer, Candidate, candidate_pool
from scenes.sample import Frame

log = logging.getLogger(__name__)

CONTEXT = "night"


def drive_frames(world: Path, frames: int) -> list[Frame]:
    """The first ``frames`` night training frames in scene order, stamped as one drive."""
    night = QADataset.load(world, "train").filter(night=True)
    ids = sorted(night.frame_ids)[:frames]
    return [dataclasses.replace(night.frame(fid), timestamp=0.5 * k) for k, fid in
            enumerate(ids)]


def run(cfg: Table1Config, n: int, frames: int, per_frame: int, store_dir: str | None = None,
        progress: bool = True, val_fraction: float = 0.2) -> dict:
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    bench = Table1(cfg, cfg.store(store_dir), progress)
    d = bench.data
    llm, tok = _load_llm(cfg)
    model = MPnPModel(llm, tok)
    drive = drive_frames(bench.world, frames)
    test = d.night_test

    def train(label: str, modality: str, data: FeatureSet, val: FeatureSet | None):
        conn = MPnPConnector(llm, tok, [bench.specs[modality]],
                             ConnectorConfig(num_blocks=n, max_new_tokens=cfg.max_new_tokens),
                             model=model, state_name=label, connection=ConnectionConfig(
                                 num_blocks=n))
        report = Trainer(conn, cfg.train_config()).fit(
            data, val if cfg.epochs > 1 else None, progress=progress)
        return conn, report

    def row(label: str, conn, report, data: FeatureSet, **extra) -> dict:
        res = evaluate(conn, test)
        return {"arm": label, "accuracy": res.accuracy, "count": res.count,
                "ci95": list(res.ci95), "per_type": res.per_type,
                "train_questions": len(data), "train_samples": report.samples,
                "wall_s": report.wall_s, **extra}

    rows = []
    with tempfile.TemporaryDirectory(prefix="mpnp-live-samples-") as tmp:
        # --- object lists -> samples -> the on-disk buffer -> read back ----------------
        live = LiveSamples(Path(tmp) / "objects", 2**40, 10**7, min_samples=2,
                           val_fraction=val_fraction, mode="live")
        balancer = AnswerBalancer(np.random.default_rng(cfg.seed))
        t0 = time.perf_counter()
        for frame in drive:
            objects = parse_objects(objects_to_wire(frame.objects), max_objects=10_000)
            samples = object_samples(frame, objects, balancer, per_frame)
            if samples:
                live.add(CONTEXT, frame, samples)
        collect_s = time.perf_counter() - t0
        split = live.training_split(CONTEXT)
        if split is None:
            raise RuntimeError("the drive gave no held-out frame; use more --frames")
        buffer = live.buffer(CONTEXT).describe()
        live_train, live_val = live_features(split, bench.encoders.__getitem__, ["lidar"])

        # --- the labelled arm: the same number of the world's night questions --------
        labelled = d.night_train.at_most(len(live_train), cfg.seed)
        conn, report = train("labelled", "lidar", labelled, d.night_val)
        labelled_row = row("labelled", conn, report, labelled)
        rows.append(labelled_row)
        model.remove_state(conn.state_name)

        conn, report = train("live-objects", "lidar", live_train, live_val)
        val_acc = evaluate(conn, live_val).accuracy
        rows.append(row("live objects", conn, report, live_train, held_out_accuracy=val_acc,
                        held_out_questions=len(live_val)))
        model.remove_state(conn.state_name)

        # --- camera teacher -> pseudo-labels about the same drive frames -------------
        teacher, teacher_report = train("teacher", "camera", d.day_train, d.day_val)
        teacher_night = evaluate(teacher, test).accuracy
        pseudo = LiveSamples(Path(tmp) / "pseudo", 2**40, 10**7, min_samples=2,
                             val_fraction=val_fraction, mode="live")
        rng = np.random.default_rng(cfg.seed + 1)
        agree = total = 0
        confidences = []
        for frame in drive:
            questions = scene_free_questions(rng, per_frame)
            tokens = {"camera": bench.encoders["camera"].encode([frame]).expand(
                len(questions), -1, -1)}
            with torch.inference_mode():
                out = teacher.generate([c.question for c in questions], tokens)
            conf = first_token_confidence(out)
            truth = {c.question: c.answer for c in candidate_pool(frame.objects or [])}
            labelled_cands = [Candidate(c.question, a, c.template_type, c.num_hop)
                              for c, a in zip(questions, out.answers)]
            for c in labelled_cands:  # how often the teacher is right (every scene-free
                if c.question in truth:  # question with a count <= MAX_COUNT is in the pool)
                    total += 1
                    agree += int(truth[c.question] == c.answer)
            confidences += conf
            pseudo.add(CONTEXT, frame, samples_from_candidates(frame, labelled_cands,
                                                               "pseudo", conf))
        model.remove_state(teacher.state_name)
        pseudo_split = pseudo.training_split(CONTEXT)
        p_train, p_val = live_features(pseudo_split, bench.encoders.__getitem__, ["lidar"])
        conn, report = train("pseudo", "lidar", p_train, p_val)
        rows.append(row("pseudo (camera teacher)", conn, report, p_train,
                        teacher_day_trained_night_test_accuracy=teacher_night,
                        teacher_agreement_with_truth=agree / total if total else None,
                        teacher_checked=total,
                        mean_confidence=float(np.mean(confidences)) if confidences else None))
        model.remove_state(conn.state_name)

    majority = majority_baseline(labelled.items, test.items)
    rows.append({"arm": "majority", "accuracy": majority.accuracy, "count": majority.count,
                 "ci95": list(majority.ci95)})
    live_acc = rows[1]["accuracy"]
    lab_acc = labelled_row["accuracy"]
    meta = {"benchmark": "live-samples", "N": n, "llm": llm_fingerprint(llm),
            "drive_frames": len(drive), "questions_per_frame": per_frame,
            "val_fraction": val_fraction, "buffer": buffer, "collect_s": collect_s,
            "encoders": {m: e.fingerprint() for m, e in bench.encoders.items()},
            "night_test_questions": len(test),
            "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
            "total_wall_s": time.perf_counter() - started}
    return {"ratio": live_acc / lab_acc if lab_acc > 0 else None,
            "target_ratio": 0.9, "meta": meta, "rows": rows}


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    out = [f"# mpnp bench live-samples — LiDAR states, mPnP N={meta['N']} on "
           f"{_llm_name(meta)}", "",
           f"A simulated night drive of {meta['drive_frames']} frames, "
           f"{meta['questions_per_frame']} questions per frame; every arm tested on the same "
           f"{meta['night_test_questions']} night test questions (exact match, %, 95 % "
           "Wilson interval).", "",
           "| arm | train questions | night test accuracy |", "|---|---|---|"]
    for r in result["rows"]:
        lo, hi = wilson_interval(r["accuracy"], r["count"])
        out.append(f"| {r['arm']} | {r.get('train_questions', '–')} | "
                   f"{100 * r['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] |")
    ratio = result["ratio"]
    out += ["", f"Ratio live objects ÷ labelled: "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'} (target ≥ "
            f"{result['target_ratio']:.2f})."]
    pseudo = next(r for r in result["rows"] if r["arm"].startswith("pseudo"))
    agreement = pseudo.get("teacher_agreement_with_truth")
    out.append(f"Camera teacher: {100 * pseudo['teacher_day_trained_night_test_accuracy']:.1f} % "
               f"on the night test questions; its pseudo-labels agree with the ground truth on "
               f"{'n/a' if agreement is None else f'{100 * agreement:.1f} %'} of "
               f"{pseudo['teacher_checked']} checkable answers (mean first-token confidence "
               f"{pseudo['mean_confidence']:.2f}).")
    return "\n".join(out) + "\n"


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("live-samples", help="a LiDAR state adapted from a drive's "
                             "object lists (and from camera pseudo-labels) against one "
                             "adapted on the labelled night split")
    p.add_argument("--quick", action="store_true", help="tiny world, encoders and LLM")
    p.add_argument("--model")
    p.add_argument("--store")
    p.add_argument("--num-blocks", type=int, default=12)
    p.add_argument("--frames", type=int, default=160, help="drive frames (night train)")
    p.add_argument("--questions-per-frame", type=int, default=4)
    p.add_argument("--test-samples", type=int, default=200)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from bench.cli import write_output

    cfg = Table1Config.quick() if args.quick else Table1Config()
    cfg.oracle = False
    cfg.night_samples = None  # the labelled arm draws as many as the live arm has
    if args.model:
        cfg.model = args.model
    if not args.quick:
        cfg.test_samples = args.test_samples
    n = min(args.num_blocks, 4) if args.quick else args.num_blocks
    frames = min(args.frames, 20) if args.quick else args.frames
    result = run(cfg, n, frames, args.questions_per_frame, args.store,
                 progress=not args.no_progress)
    md = to_markdown(result)
    print(md)
    write_output(args.json, json.dumps(result, indent=2))
    write_output(args.markdown, md)
    return 0
