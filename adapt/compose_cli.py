"""``mpnp compose``: a multi-modality state from per-modality states, without training."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHOD_HELP = ("naive: mean of the inputs' ΔW = sBA (exact, as a LoRA of rank Σr); "
               "naive-ab: mean of LoRA's A and B separately (the authors' NaiveMC); "
               "damc: Σ λ_m ΔW_m (--lambdas, or --search on the validation split)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compose", help="compose saved states (e.g. camera + LiDAR) into one, "
                                       "training-free")
    p.add_argument("states", nargs="+", metavar="STATE",
                   help="saved state directories (or names under STORE/states/)")
    p.add_argument("--method", choices=("naive", "naive-ab", "damc"), default="naive",
                   help=METHOD_HELP)
    p.add_argument("-o", "--out", required=True, help="directory to write the composed state")
    p.add_argument("--name", default="composed", help="name of the composed state")
    p.add_argument("--blocks", choices=("union", "intersection"), default="union",
                   help="inputs with different N: connect max N (union) or min N")
    p.add_argument("--prefer", action="append", default=[], metavar="MODALITY=INDEX",
                   help="input (0-based) whose aligners win when inputs carry different "
                        "aligners for MODALITY")
    p.add_argument("--lambdas", help="damc: comma-separated λ, one per STATE")
    p.add_argument("--search", action="store_true",
                   help="damc: choose λ on the validation split of the prepared world in STORE")
    p.add_argument("--store", help="model store (default: $MPNP_HOME or ~/.cache/mpnp)")
    p.add_argument("--model", help="LLM for --search (default: embedded SmolLM2)")
    p.add_argument("--context", choices=("day", "night"), default="night",
                   help="--search: which validation questions")
    p.add_argument("--val-samples", type=int, default=200,
                   help="--search: validation questions per evaluation (0 = all)")
    p.add_argument("--max-evals", type=int, default=12, help="--search: evaluation budget")
    p.add_argument("--grid", default="0,0.25,0.5,0.75,1", help="--search: λ values to try")
    p.set_defaults(func=_compose)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _prefer(items: list[str], count: int) -> dict[str, int]:
    out = {}
    for item in items:
        modality, _, index = item.partition("=")
        if not modality or not index.isdigit() or int(index) >= count:
            raise ValueError(f"--prefer wants MODALITY=INDEX with INDEX in 0..{count - 1}, "
                             f"got {item!r}")
        out[modality] = int(index)
    return out


def _state_dir(text: str, store: str | None) -> Path:
    from mpnp.paths import model_store_dir

    path = Path(text).expanduser()
    if path.is_dir():
        return path
    candidate = model_store_dir(store) / "states" / text
    if candidate.is_dir():
        return candidate
    raise FileNotFoundError(f"no saved state at {path} (nor {candidate})")


def _compose(args: argparse.Namespace) -> int:
    from aligners.compose import compose_states
    from aligners.state import read_state, write_state

    if args.method != "damc" and (args.lambdas or args.search):
        raise ValueError("--lambdas and --search are for --method damc")
    if args.method == "damc" and not args.lambdas and not args.search:
        raise ValueError("--method damc needs its λ: give --lambdas L1,L2,... (one per STATE) "
                         "or --search to choose them on the validation split of the prepared "
                         "world in --store")
    if args.lambdas and args.search:
        raise ValueError("give either --lambdas or --search, not both")
    if args.val_samples < 0 or args.max_evals < 1:
        raise ValueError("--val-samples must be >= 0 and --max-evals >= 1")
    started = time.perf_counter()
    states = [read_state(_state_dir(s, args.store)) for s in args.states]
    read_s = time.perf_counter() - started
    options = {"blocks": args.blocks, "prefer": _prefer(args.prefer, len(states)),
               "name": args.name}
    if args.search:
        options.update(evaluate=_search_evaluator(args), max_evals=args.max_evals,
                       grid=_floats(args.grid, "--grid"))
    elif args.lambdas:
        options["lambdas"] = _floats(args.lambdas, "--lambdas")
    composed = compose_states(states, args.method, **options)
    write_state(composed, args.out)
    info = composed.config["composition"]
    print(f"composed   {args.name} = {' + '.join(info['inputs'])} by {args.method} "
          f"(N={composed.num_blocks}, connected {', '.join(composed.connected)})")
    if info["lambdas"] is not None:
        print(f"lambdas    {', '.join(f'{x:g}' for x in info['lambdas'])}")
    if "search" in info:
        s = info["search"]
        flops = "" if s["inference_flops"] is None else \
            f", {s['inference_flops'] / 1e9:.3f} GFLOPs inference"
        print(f"search     {s['evaluations']} evaluations, {s['questions']} validation "
              f"questions, {s['wall_s']:.1f} s{flops}; best accuracy {100 * s['accuracy']:.1f} %")
    print(f"time       read {read_s:.3f} s, compose {info['compose_s']:.3f} s, "
          f"0 training FLOPs")
    print(f"saved      {Path(args.out)}")
    if args.verbose:
        print(json.dumps(info, indent=2))
    return 0


def _search_evaluator(args: argparse.Namespace):
    from adapt.composition import validation_evaluator, validation_features
    from adapt.prepare import open_prepared
    from aligners.model import MPnPModel
    from mpnp.llm import load_llm

    prepared = open_prepared(args.store)
    llm, tok = load_llm(args.model, store=args.store)
    val = validation_features(prepared, args.context, args.val_samples or None)
    return validation_evaluator(MPnPModel(llm, tok), val)
