"""``mpnp bench core``: what one mPnP training step costs against full fine-tuning.

For each N it measures, on the resident LLM (SmolLM2 by default):

- FLOPs of one training step (forward + backward), counted by ``torch.utils.flop_counter``,
  beside the analytic model of the mPnP-LLM paper (:mod:`mpnp.cost_model`);
- peak memory of one training step (forward, backward, AdamW step), and the bytes autograd
  saves for backward;
- forward latency of a query with modalities connected against the bare LLM.

Each training configuration runs in a fresh worker process so that one configuration's
freed-but-cached memory cannot hide or inflate another's peak. Latencies are measured in
one process, interleaved round by round, and reported as ratios (this machine is noisy).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_NS = (4, 8, 15, 22, 30)
#: A realistic query batch: nuScenes-QA style questions and answers.
QUESTIONS = (
    "How many cars are there?",
    "Are there any moving pedestrians?",
    "What status is the truck to the front left of the parked car?",
    "Is the number of buses greater than the number of barriers?",
)
ANSWERS = ("3", "yes", "parked", "no")
#: The camera modality as the encoders produce it: 6 views × 4 [CLS] tokens of width 192.
CAMERA_TOKENS, CAMERA_DIM = 24, 192


def _setup(model_path: str | None, n_blocks: int, device: str, seed: int = 0):
    import torch

    from aligners.config import ConnectionConfig, ModalitySpec
    from aligners.model import MPnPModel
    from mpnp.llm import load_llm

    torch.manual_seed(seed)
    llm, tok = load_llm(model_path, device=device)
    model = MPnPModel(llm, tok)
    spec = ModalitySpec("camera", CAMERA_DIM, CAMERA_TOKENS)
    model.create_state("bench", [spec], ConnectionConfig(num_blocks=n_blocks))
    return model, spec


def _batch(model, batch_size: int, device: str):
    import torch

    from mpnp.generation import encode_training

    reps = -(-batch_size // len(QUESTIONS))
    qs, ans = (QUESTIONS * reps)[:batch_size], (ANSWERS * reps)[:batch_size]
    batch = encode_training(model.tokenizer, qs, ans).to(device)
    tokens = {"camera": torch.randn(batch_size, CAMERA_TOKENS, CAMERA_DIM, device=device)}
    return batch, tokens


def measure_training_step(
    model_path: str | None, mode: str, n_blocks: int, batch_size: int, device: str
) -> dict:
    """One configuration (run inside a worker process): FLOPs, memory, time of a step."""
    import torch

    from mpnp.cost_model import aligner_flops_per_token, analytic_step_cost
    from mpnp.measure import PeakMemory, SavedActivations, count_flops, timed

    n_conn = n_blocks if mode == "mpnp" else None
    model, spec = _setup(model_path, n_conn if n_conn is not None else 0, device)
    if mode == "full":  # every LLM weight trains; modalities still enter all blocks
        model.set_num_blocks(model.geometry.num_layers)
        model.set_trainable()
        model.llm.requires_grad_(True)
    else:
        model.set_trainable()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=2e-5)
    batch, tokens = _batch(model, batch_size, device)
    model.train()

    def step():
        optim.zero_grad(set_to_none=True)
        out = model(
            batch.input_ids,
            batch.attention_mask,
            tokens,
            position_ids=batch.position_ids,
            labels=batch.labels,
        )
        out.loss.backward()
        optim.step()

    with torch.no_grad():  # touch every weight page first (safetensors loads lazily, mmap)
        model(batch.input_ids, batch.attention_mask, tokens, position_ids=batch.position_ids)
    with PeakMemory(device) as mem:  # first step: includes creating the optimizer state
        step()
    saved = SavedActivations(exclude=model.parameters())
    with count_flops() as flops:
        with saved.track():
            out = model(
                batch.input_ids,
                batch.attention_mask,
                tokens,
                position_ids=batch.position_ids,
                labels=batch.labels,
            )
        out.loss.backward()
    optim.zero_grad(set_to_none=True)
    times = [timed(step, device=device) for _ in range(3)]
    geom = model.geometry
    cost = analytic_step_cost(
        model.llm,
        batch=batch_size,
        text_tokens=batch.input_ids.shape[1],
        prefix_tokens=spec.num_tokens,
        aligner_flops_per_token=aligner_flops_per_token(spec.embed_dim, geom.kv_width),
        n_blocks_for_prefix=model.state.config.num_blocks,
    )
    analytic = cost.full_finetune() if mode == "full" else cost.mpnp(n_blocks)
    return {
        "mode": mode,
        "N": model.state.config.num_blocks,
        "measured_flops": flops.total,
        "analytic_flops": analytic,
        "analytic_terms": cost.to_dict(),
        "peak_mem_bytes": int(mem.peak_bytes),
        "saved_activation_bytes": int(saved.bytes),
        "trainable_params": int(sum(p.numel() for p in params)),
        "step_s": statistics.median(times),
    }


def measure_latency(model_path: str | None, ns, device: str, rounds: int) -> dict:
    """Forward latency of one query, bare vs connected, interleaved round by round."""
    import torch

    from mpnp.generation import encode_prompts
    from mpnp.measure import timed

    model, _ = _setup(model_path, max(ns), device)
    prompt = encode_prompts(model.tokenizer, [QUESTIONS[2]]).to(device)
    tokens = {"camera": torch.randn(1, CAMERA_TOKENS, CAMERA_DIM, device=device)}

    def bare():
        model.activate(None)
        model(prompt.input_ids, prompt.attention_mask, position_ids=prompt.position_ids)

    def connected(n):
        def run():
            model.activate("bench")
            model.set_num_blocks(n)
            model(prompt.input_ids, prompt.attention_mask, tokens, position_ids=prompt.position_ids)

        return run

    runs = {"bare": bare} | {f"N={n}": connected(n) for n in ns}
    samples: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(rounds):
            for key, fn in runs.items():
                samples[key].append(timed(fn, device=device))
    bare_med = statistics.median(samples["bare"])
    return {
        "prompt_tokens": int(prompt.input_ids.shape[1]),
        "rounds": rounds,
        "bare_ms": bare_med * 1e3,
        "connected": [
            {
                "N": n,
                "ms": statistics.median(samples[f"N={n}"]) * 1e3,
                "ratio_to_bare": statistics.median(samples[f"N={n}"]) / bare_med,
            }
            for n in ns
        ],
    }


def _worker(args: dict) -> dict:
    return measure_training_step(
        args["model"], args["mode"], args["n"], args["batch"], args["device"]
    )


def _spawn(args: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.core", "--worker", json.dumps(args)]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    model_path: str | None = None,
    ns=DEFAULT_NS,
    batch: int = 4,
    device: str = "cpu",
    rounds: int = 15,
    progress: bool = True,
) -> dict:
    """Run the whole benchmark and return its result dictionary."""
    import torch
    from tqdm import tqdm

    configs = [{"mode": "mpnp", "n": n} for n in ns] + [{"mode": "full", "n": 0}]
    rows = []
    for cfg in tqdm(configs, desc="training steps", disable=not progress):
        rows.append(_spawn(cfg | {"model": model_path, "batch": batch, "device": device}))
    full = rows.pop()
    for row in rows:
        row["flops_vs_full_measured"] = row["measured_flops"] / full["measured_flops"]
        row["flops_vs_full_analytic"] = row["analytic_flops"] / full["analytic_flops"]
        row["measured_vs_analytic"] = row["measured_flops"] / row["analytic_flops"]
        row["peak_mem_vs_full"] = row["peak_mem_bytes"] / full["peak_mem_bytes"]
    latency = measure_latency(model_path, ns, device, rounds)
    return {
        "meta": {
            "benchmark": "core",
            "llm": model_path or "embedded:smollm2-135m-instruct",
            "device": device if device != "cuda" else torch.cuda.get_device_name(),
            "machine": f"{platform.machine()} {platform.processor() or ''} "
            f"{os.cpu_count()} cpus".strip(),
            "torch": torch.__version__,
            "batch": batch,
            "modality_tokens": CAMERA_TOKENS,
            "date": time.strftime("%Y-%m-%d"),
        },
        "rows": rows,
        "full_finetune": full,
        "latency": latency,
    }


def to_markdown(result: dict) -> str:
    full = result["full_finetune"]
    lines = [
        f"# mpnp bench core — {result['meta']['llm']} on {result['meta']['device']}",
        "",
        f"Batch {result['meta']['batch']}, {result['meta']['modality_tokens']} camera tokens; "
        "one training step = forward + backward + AdamW.",
        "",
        "| N | measured GFLOPs | analytic GFLOPs | measured/analytic | vs full (measured) "
        "| vs full (analytic) | peak mem MB | vs full | saved act. MB | step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['N']} | {r['measured_flops'] / 1e9:.1f} | {r['analytic_flops'] / 1e9:.1f} | "
            f"{r['measured_vs_analytic']:.2f} | {r['flops_vs_full_measured']:.2f} | "
            f"{r['flops_vs_full_analytic']:.2f} | {r['peak_mem_bytes'] / 2**20:.0f} | "
            f"{r['peak_mem_vs_full']:.2f} | {r['saved_activation_bytes'] / 2**20:.0f} | "
            f"{r['step_s']:.2f} |"
        )
    lines.append(
        f"| full FT | {full['measured_flops'] / 1e9:.1f} | {full['analytic_flops'] / 1e9:.1f} | "
        f"{full['measured_flops'] / full['analytic_flops']:.2f} | 1.00 | 1.00 | "
        f"{full['peak_mem_bytes'] / 2**20:.0f} | 1.00 | "
        f"{full['saved_activation_bytes'] / 2**20:.0f} | {full['step_s']:.2f} |"
    )
    lat = result["latency"]
    lines += [
        "",
        f"Query forward latency ({lat['prompt_tokens']} prompt tokens, median of "
        f"{lat['rounds']} interleaved rounds): bare LLM {lat['bare_ms']:.1f} ms.",
        "",
        "| N | connected ms | ratio to bare |",
        "|---|---|---|",
    ]
    lines += [f"| {c['N']} | {c['ms']:.1f} | {c['ratio_to_bare']:.2f} |" for c in lat["connected"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        raise SystemExit("usage: mpnp bench core (this module's __main__ is its worker)")
