"""``mpnp prepare`` (Algorithm 1 offline) and ``mpnp adapt`` (one runtime Adapt)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="offline stage: world, encoders, day camera state")
    p.add_argument("--store", help="model store (default: $MPNP_HOME or ~/.cache/mpnp)")
    p.add_argument("--model", help="LLM directory or .gguf (default: embedded SmolLM2)")
    p.add_argument("--data", help="dataset directory to use instead of the synthetic world")
    p.add_argument("--num-blocks", type=int, default=12, help="N of the offline state")
    p.add_argument("--day-samples", type=int, default=1200,
                   help="day training questions (0 = all)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--recipe", default="paper", help="how mPnP states connect and start: "
                   "paper or anchored (adapt/recipe.py; default paper)")
    p.add_argument("--force", action="store_true", help="retrain the day state")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_prepare)

    a = sub.add_parser("adapt", help="runtime Select → Reconnect → Adapt from the day state")
    a.add_argument("--mode", choices=("switch", "add"), default="switch",
                   help="switch: C → NEW; add: C → C+NEW")
    a.add_argument("--new", nargs="+", default=["lidar"], metavar="MODALITY",
                   help="the modalities the context change brings (default: lidar)")
    a.add_argument("--context", choices=("day", "night"), default="night",
                   help="whose data trains, validates and tests the adapted state "
                        "(default: night, the paper's scenario)")
    n = a.add_mutually_exclusive_group()
    n.add_argument("--num-blocks", type=int, help="N of the adapted state")
    n.add_argument("--budget-tflops", type=float,
                   help="FLOPs budget of the whole run (N solved by the cost model)")
    a.add_argument("--samples", type=int, default=0,
                   help="training questions of the context (0 = all)")
    a.add_argument("--epochs", type=int, default=3)
    a.add_argument("--store")
    a.add_argument("--model")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=_adapt)


def _prepare_config(args: argparse.Namespace):
    from adapt.prepare import PrepareConfig, fast_train_config
    from adapt.recipe import recipe_named

    if args.day_samples < 0 or args.num_blocks < 1 or args.epochs < 1:
        raise ValueError("--day-samples must be >= 0, --num-blocks and --epochs >= 1")
    return PrepareConfig(data_dir=args.data, num_blocks=args.num_blocks,
                         day_samples=args.day_samples or None,
                         train=fast_train_config(epochs=args.epochs),
                         recipe=recipe_named(args.recipe))


def _prepare(args: argparse.Namespace) -> int:
    from adapt.prepare import ensure_prepared

    prepared = ensure_prepared(args.store, _prepare_config(args), model_path=args.model,
                               progress=not args.no_progress, force=args.force)
    rec = prepared.record
    print(f"data       {prepared.data_dir}")
    for modality, enc in prepared.encoders.items():
        print(f"encoder    {modality}: {enc.kind} ({enc.num_tokens} tokens × {enc.dim})")
    print(f"day state  {prepared.state_dir} (N={rec['num_blocks']}, "
          f"{rec['day_questions']} day questions)")
    print(f"accuracy   day {100 * rec['day_accuracy']:.1f} %, night "
          f"{100 * rec['night_accuracy']:.1f} % (camera only)")
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from adapt.algorithm import runtime_adapt
    from adapt.data import load_splits, modality_specs
    from adapt.evaluate import evaluate
    from adapt.prepare import fast_train_config, load_day_connector, open_prepared
    from adapt.recipe import ALIGNER_STATE
    from aligners.model import MPnPModel
    from aligners.state import save_state
    from mpnp.llm import load_llm

    progress = not args.no_progress
    prepared = open_prepared(args.store)
    llm, tok = load_llm(args.model, store=args.store)
    model = MPnPModel(llm, tok)
    day = load_day_connector(prepared, model)
    splits = load_splits(prepared.data_dir, prepared.encoders, prepared.feature_cache(),
                         progress=progress)
    context = args.context
    train = getattr(splits, f"{context}_train")
    if args.samples and args.samples < len(train):
        train = train.fraction(args.samples / len(train))
    test = getattr(splits, f"{context}_test")
    before = evaluate(day, test)
    budget = args.budget_tflops * 1e12 if args.budget_tflops else None
    name = f"{context}-{args.mode}" + ("" if args.new == ["lidar"] else "-" + "-".join(args.new))
    fork, report, decision = runtime_adapt(
        day, args.mode, modality_specs(prepared.encoders), train,
        getattr(splits, f"{context}_val"), fast_train_config(epochs=args.epochs),
        num_blocks=args.num_blocks, budget_flops=budget, name=name, progress=progress,
        new=args.new, aligners_from=ALIGNER_STATE if ALIGNER_STATE in model.states else None)
    after = evaluate(fork, test)
    out = prepared.store_dir / "states" / name
    save_state(model, out, fork.state_name)
    summary = {
        "mode": args.mode, "new": args.new, "context": context,
        "N": model.states[fork.state_name].config.num_blocks,
        "budget": vars(decision) if decision else None,
        f"{context}_accuracy_before": before.accuracy,
        f"{context}_accuracy_after": after.accuracy,
        "per_type_after": after.per_type, "train": report.to_dict(), "state_dir": str(out),
    }
    (out / "adapt.json").write_text(json.dumps(summary, indent=2))
    print(f"adapted    {args.mode} {'+'.join(args.new)} with N={summary['N']} on {len(train)} "
          f"{context} questions in {report.wall_s:.0f} s ({report.flops / 1e12:.2f} TFLOPs "
          "measured)")
    print(f"{context:<10} {100 * before.accuracy:.1f} % → {100 * after.accuracy:.1f} %")
    print(f"saved      {Path(out)}")
    return 0
