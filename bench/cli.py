"""``mpnp bench ...``: the project's benchmarks.

Each benchmark lives in its own module listed in :data:`BENCH_MODULES`; a module adds its
sub-command with ``add_bench_command(bench_subparsers)`` (``core`` is defined here).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

#: Modules that contribute a benchmark (each defines ``add_bench_command(subparsers)``).
BENCH_MODULES: tuple[str, ...] = (
    "bench.table1", "bench.savings", "bench.modalities", "bench.encoders", "bench.daemon",
    "bench.reliability", "bench.recording", "bench.live_samples", "bench.grounding",
    "bench.reader",
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError("need at least one non-negative integer")
    return values


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    core = bench_sub.add_parser(
        "core", help="training-step FLOPs/memory per N vs full fine-tuning; query latency"
    )
    core.add_argument("--model", help="LLM directory or .gguf (default: embedded SmolLM2)")
    core.add_argument("--ns", type=_ints, default=(4, 8, 15, 22, 30), help="values of N")
    core.add_argument("--batch", type=int, default=4)
    core.add_argument("--rounds", type=int, default=15, help="latency rounds")
    core.add_argument("--device", default="cpu")
    core.add_argument("--json", type=Path, help="write the result JSON here")
    core.add_argument("--markdown", type=Path, help="write the Markdown table here")
    core.set_defaults(func=_core)
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # only the benchmark's own module may be absent
                raise
            continue
        module.add_bench_command(bench_sub)


def write_output(path: Path | None, text: str) -> None:
    """Write a benchmark artefact, creating its folder."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _core(args: argparse.Namespace) -> int:
    from bench import core

    if args.batch < 1 or args.rounds < 1:
        raise ValueError("--batch and --rounds must be >= 1")
    result = core.run(args.model, args.ns, args.batch, args.device, args.rounds)
    markdown = core.to_markdown(result)
    print(markdown)
    write_output(args.json, json.dumps(result, indent=2))
    write_output(args.markdown, markdown)
    return 0
