"""``mpnp bench encoders``: encoder network latency, PyTorch vs onnxruntime, side by side.

Both runtimes execute the same frozen network on the same input in one process; rounds are
interleaved (and alternate which runtime goes first) so that CPU frequency changes and
neighbours' load hit both alike. Reported: median / p90 milliseconds per call, the ratio
torch / onnxruntime (> 1: onnxruntime is faster) and the largest absolute difference of
the outputs. Preprocessing (numpy) is the same code for both and is not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("need at least one positive integer")
    return values


def add_bench_command(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "encoders", help="encoder latency: PyTorch vs onnxruntime, interleaved rounds")
    p.add_argument("--kinds", default="all", help="comma-separated encoder kinds, or 'all'")
    p.add_argument("--batches", type=_ints, default=(1, 8), help="batch sizes, e.g. 1,8")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per runtime")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--store", help="model store with pretrained encoders (default: the usual)")
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="onnxruntime providers, comma-separated, in order of preference")
    p.add_argument("--json", type=Path, help="write the result JSON here")
    p.add_argument("--markdown", type=Path, help="write the Markdown table here")
    p.set_defaults(func=_main)


def _encoder(kind: str, store):
    """The pretrained encoder if the store has one, else a fresh one (same network cost)."""
    from encoders import create_encoder, load_encoder
    from encoders.pretrain import encoder_dir

    directory = encoder_dir(kind, store)
    if (directory / "encoder.json").is_file():
        return load_encoder(directory), "pretrained"
    return create_encoder(kind).freeze(), "random init (latency does not depend on weights)"


def _stats(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"median_ms": round(statistics.median(ms), 3),
            "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 3),
            "min_ms": round(ms[0], 3)}


def run(kinds: list[str], batches: tuple[int, ...], rounds: int, warmup: int, store=None,
        providers: tuple[str, ...] = ("CPUExecutionProvider",), encoders: dict | None = None
        ) -> dict:
    """Time every kind (``encoders`` may supply the encoder objects, e.g. in tests)."""
    import onnxruntime
    import torch

    from encoders.onnx_export import OnnxEncoder, OnnxRuntimeConfig, export_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            if encoders and kind in encoders:
                encoder, weights = encoders[kind].freeze(), "given"
            else:
                encoder, weights = _encoder(kind, store)
            path = export_onnx(encoder, Path(tmp) / f"{kind}.onnx")
            runtime = OnnxEncoder(path, encoder, OnnxRuntimeConfig(providers=providers))
            for batch in batches:
                gen = torch.Generator().manual_seed(batch)
                x = torch.rand(encoder.example_input(batch).shape, generator=gen)
                x_np = x.numpy()

                def run_torch(x=x):
                    with torch.no_grad():
                        return encoder(x)

                def run_ort(x_np=x_np):
                    return runtime.run(x_np)

                diff = float((run_torch() - torch.from_numpy(run_ort())).abs().max())
                for _ in range(warmup):
                    run_torch()
                    run_ort()
                times = {"torch": [], "onnxruntime": []}
                for r in range(rounds):
                    order = (("torch", run_torch), ("onnxruntime", run_ort))
                    for name, fn in order if r % 2 == 0 else order[::-1]:
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
                t, o = _stats(times["torch"]), _stats(times["onnxruntime"])
                rows.append({"kind": kind, "weights": weights, "batch": batch,
                             "tokens": [encoder.num_tokens, encoder.dim],
                             "torch": t, "onnxruntime": o,
                             "ratio_torch_over_ort": round(t["median_ms"] / o["median_ms"], 3),
                             "max_abs_diff": diff, "providers": runtime.providers})
    return {"benchmark": "encoders", "rounds": rounds, "warmup": warmup,
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "onnxruntime": onnxruntime.__version__},
            "rows": rows}


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Encoder latency: PyTorch vs onnxruntime", "",
             f"{m['platform']}, torch {m['torch']} ({m['torch_threads']} threads), "
             f"onnxruntime {m['onnxruntime']}; {result['rounds']} interleaved rounds after "
             f"{result['warmup']} warm-up calls. Network only (after preprocess). "
             "Ratio > 1: onnxruntime is faster.", "",
             "| encoder | batch | tokens | torch median ms | ort median ms | torch p90 | ort p90 "
             "| torch/ort | max abs diff | providers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['kind']} | {r['batch']} | {r['tokens'][0]}x{r['tokens'][1]} | "
                     f"{r['torch']['median_ms']:.2f} | {r['onnxruntime']['median_ms']:.2f} | "
                     f"{r['torch']['p90_ms']:.2f} | {r['onnxruntime']['p90_ms']:.2f} | "
                     f"{r['ratio_torch_over_ort']:.2f} | {r['max_abs_diff']:.1e} | "
                     f"{', '.join(p.replace('ExecutionProvider', '') for p in r['providers'])} |")
    weights = sorted({r["weights"] for r in result["rows"]})
    lines += ["", f"Weights: {'; '.join(weights)}."]
    return "\n".join(lines) + "\n"


def _main(args: argparse.Namespace) -> int:
    from encoders import encoder_class, list_encoders

    if args.rounds < 1 or args.warmup < 0:
        raise ValueError("--rounds must be >= 1 and --warmup >= 0")
    kinds = list_encoders() if args.kinds == "all" else [k.strip() for k in args.kinds.split(",")]
    for kind in kinds:
        encoder_class(kind)  # unknown kind -> ValueError listing the known ones
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    result = run(kinds, args.batches, args.rounds, args.warmup, args.store, providers)
    markdown = to_markdown(result)
    print(markdown)
    for path, text in ((args.json, json.dumps(result, indent=2) + "\n"),
                       (args.markdown, markdown)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return 0
