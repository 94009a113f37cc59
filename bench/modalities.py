"""``mpnp bench modalities``: does the world make the modalities differ as the paper's do?

One mPnP state per modality set — camera (C), LiDAR (L), radar (R) and their combinations
(C+L, C+R, L+R, C+L+R) — trained from scratch on the same *day* questions and evaluated on
day and night test questions. What the adaptation story needs: in daylight C+L beats C and L
(the camera carries something the LiDAR lacks); at night C falls while L and R hold (neither
depends on light); R carries velocity (moving vs parked/stopped) that neither C nor L has in
one frame. Sets whose encoders the store lacks are skipped (named in the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from adapt.connectors.base import ConnectorConfig
from adapt.connectors.mpnp import MPnPConnector
from adapt.evaluate import evaluate, majority_baseline, wilson_interval
from adapt.trainer import Trainer
from aligners.config import ConnectionConfig
from aligners.model import MPnPModel
from bench.table1 import Table1, Table1Config, _llm_name, _load_llm
from mpnp.llm import llm_fingerprint

#: Label -> modality set, in the table's order.
SETS: dict[str, tuple[str, ...]] = {
    "C": ("camera",), "L": ("lidar",), "R": ("radar",),
    "C+L": ("camera", "lidar"), "C+R": ("camera", "radar"), "L+R": ("lidar", "radar"),
    "C+L+R": ("camera", "lidar", "radar"),
}


def select_sets(labels: list[str] | None, available: set[str]) -> tuple[dict, list[str]]:
    """The sets to run (``labels`` or all) whose modalities have encoders, and the labels
    skipped for a missing encoder."""
    unknown = sorted(set(labels or ()) - set(SETS))
    if unknown:
        raise ValueError(f"unknown modality sets {unknown}; known: {list(SETS)}")
    wanted = {k: v for k, v in SETS.items() if labels is None or k in labels}
    run = {k: v for k, v in wanted.items() if set(v) <= available}
    return run, [k for k in wanted if k not in run]


def run(cfg: Table1Config, n: int, store_dir: str | None = None, progress: bool = True,
        sets: list[str] | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    bench = Table1(cfg, cfg.store(store_dir), progress)
    chosen, skipped = select_sets(sets, set(bench.specs))
    d = bench.data
    llm, tok = _load_llm(cfg)
    model = MPnPModel(llm, tok)
    rows = []
    for label, names in chosen.items():
        conn = MPnPConnector(llm, tok, [bench.specs[m] for m in names],
                             ConnectorConfig(num_blocks=n, max_new_tokens=cfg.max_new_tokens),
                             model=model, state_name=f"day-{label.replace('+', '')}",
                             connection=ConnectionConfig(num_blocks=n))
        report = Trainer(conn, cfg.train_config()).fit(d.day_train, None, progress=progress)
        for light, test in (("day", d.day_test), ("night", d.night_test)):
            res = evaluate(conn, test)
            rows.append({"modalities": label, "light": light, "accuracy": res.accuracy,
                         "count": res.count, "ci95": list(res.ci95), "per_type": res.per_type,
                         "train_samples": report.samples, "wall_s": report.wall_s})
        model.remove_state(conn.state_name)
    for light, test in (("day", d.day_test), ("night", d.night_test)):
        res = majority_baseline(d.day_train.items, test.items)
        rows.append({"modalities": "majority", "light": light, "accuracy": res.accuracy,
                     "count": res.count, "ci95": list(res.ci95)})
    meta = {"benchmark": "modalities", "N": n, "llm": llm_fingerprint(llm),
            "sets": {k: list(v) for k, v in chosen.items()}, "skipped_sets": skipped,
            "encoders": {m: e.fingerprint() for m, e in bench.encoders.items()},
            "sizes": {"day_train": len(d.day_train), "day_test": len(d.day_test),
                      "night_test": len(d.night_test)},
            "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
            "total_wall_s": time.perf_counter() - started}
    return {"meta": meta, "rows": rows}


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    rows = {(r["modalities"], r["light"]): r for r in result["rows"]}

    def cell(label: str, light: str) -> str:
        row = rows[(label, light)]
        if "count" not in row:  # results written before intervals were recorded
            return f"{100 * row['accuracy']:.1f}"
        lo, hi = wilson_interval(row["accuracy"], row["count"])
        return f"{100 * row['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"

    out = [f"# mpnp bench modalities — mPnP N={meta['N']} on {_llm_name(meta)}", "",
           f"Each set trained on the same {meta['sizes']['day_train']} day questions; "
           f"tested on {meta['sizes']['day_test']} day / {meta['sizes']['night_test']} night "
           "questions (exact match, %, 95 % Wilson interval).", "", "| modalities | day | night |",
           "|---|---|---|"]
    skipped = meta.get("skipped_sets") or []
    labels = list(meta.get("sets") or ("C", "L", "C+L"))
    for label in (*labels, "majority"):
        out.append(f"| {label} | {cell(label, 'day')} | {cell(label, 'night')} |")
    if skipped:
        out += ["", f"Skipped (no encoder in the store): {', '.join(skipped)}."]
    return "\n".join(out) + "\n"


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("modalities", help="C, L, R and their combinations trained on "
                             "day data, tested day and night (does the world separate them?)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model")
    p.add_argument("--store")
    p.add_argument("--num-blocks", type=int, default=12)
    p.add_argument("--sets", nargs="+", metavar="SET", choices=list(SETS),
                   help=f"modality sets to run (default: all of {' '.join(SETS)})")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from bench.cli import write_output

    cfg = Table1Config.quick() if args.quick else Table1Config()
    if args.model:
        cfg.model = args.model
    n = min(args.num_blocks, 8) if args.quick else args.num_blocks
    result = run(cfg, n, args.store, progress=not args.no_progress, sets=args.sets)
    md = to_markdown(result)
    print(md)
    write_output(args.json, json.dumps(result, indent=2))
    write_output(args.markdown, md)
    return 0
