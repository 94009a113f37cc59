"""``mpnp bench savings``: what each of the trainer's cost savings is worth, measured.

Beyond the paper, adaptation is made cheaper than the method's own cost model:

1. **lower-block replay** — the hidden states entering block ``L − N`` depend on neither
   the sensors nor any trainable parameter, so from the second epoch on they are replayed
   from a per-sample cache instead of recomputed (:mod:`adapt.connectors.mpnp`);
2. **answer-only logits** — the LM head (a 49k × 576 matmul for SmolLM2) runs only at the
   answer positions the loss needs;
3. **cached encoder outputs** — frozen encoders run once per frame, ever
   (:class:`encoders.cache.FeatureCache`);
4. **bfloat16 autocast** (``TrainConfig.autocast``) on a device with bfloat16 matrix units
   (AMX / AVX512-BF16 CPUs, Ampere-and-later GPUs); the trained tensors stay float32.

For 1, 2 and 4 a training step with and without the saving is measured side by side
(FLOPs counted, time interleaved, median); for 3, getting one batch of frame tokens by
loading + encoding the frames against reading them from the cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adapt.connectors.base import ConnectorConfig
from adapt.connectors.mpnp import MPnPConnector
from adapt.features import FeatureSet
from adapt.precision import autocast_context, bf16_supported
from adapt.trainer import TrainConfig, Trainer
from aligners.config import ModalitySpec
from mpnp.measure import count_flops

BF16_VARIANT = "both savings + bfloat16 autocast"


def _step_cost(trainer: Trainer, batch, autocast: str = "off") -> tuple[float, float]:
    """FLOPs (counted) and seconds (timed, uncounted) of one forward + backward."""
    device = trainer.connector.device()

    def forward_backward() -> None:
        with autocast_context(autocast, device):
            loss = trainer.connector.loss(batch)
        loss.float().backward()

    with count_flops() as flops:
        forward_backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    t = time.perf_counter()
    forward_backward()
    seconds = time.perf_counter() - t
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(flops.total), seconds


def measure_training_savings(llm, tokenizer, data: FeatureSet, spec: ModalitySpec, n: int,
                             batch_size: int, rounds: int) -> dict:
    conn = MPnPConnector(llm, tokenizer, [spec], ConnectorConfig(num_blocks=n))
    trainer = Trainer(conn, TrainConfig(batch_size=batch_size, count_flops=False,
                                        learning_rates={"aligners": 1e-3, "lora": 1e-3,
                                                        "connections": 1e-1}))
    conn.train()
    batch = data.batch(list(range(min(batch_size, len(data)))))
    conn.loss(batch).backward()  # first epoch: fills the lower-block cache
    trainer.optimizer.zero_grad(set_to_none=True)
    variants = {
        "both savings": {"cache_hidden": True, "answer_logits_only": True},
        "no lower-block replay": {"cache_hidden": False, "answer_logits_only": True},
        "no answer-only logits": {"cache_hidden": True, "answer_logits_only": False},
        "neither (the paper's cost)": {"cache_hidden": False, "answer_logits_only": False},
    }
    if bf16_supported(conn.device()):  # emulated bfloat16 is slower: not a saving there
        variants[BF16_VARIANT] = {"cache_hidden": True, "answer_logits_only": True,
                                  "autocast": "bfloat16"}
    results = {name: {"flops": 0.0, "times": []} for name in variants}
    for _ in range(rounds):  # interleaved, so drift on a noisy machine hits all alike
        for name, flags in variants.items():
            conn.cache_hidden = flags["cache_hidden"]
            conn.config.answer_logits_only = flags["answer_logits_only"]
            flops, seconds = _step_cost(trainer, batch, flags.get("autocast", "off"))
            results[name]["flops"] = flops
            results[name]["times"].append(seconds)
    base = results["neither (the paper's cost)"]
    out = {}
    for name, r in results.items():
        step_s = statistics.median(r["times"])
        out[name] = {"step_flops": r["flops"], "step_s": step_s,
                     "flops_vs_paper": r["flops"] / base["flops"],
                     "time_vs_paper": step_s / statistics.median(base["times"])}
    return out


def measure_encoder_cache(encoder, data, frame_ids: list[str], rounds: int) -> dict:
    from encoders.cache import FeatureCache, encode_frames

    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp)
        # keyed as training reads it (id + the manifest's content digest), so a hit loads
        # no frame
        encode_frames(encoder, frame_ids, data.frame, cache, progress=False,
                      key_of=data.cache_key)  # fill
        fresh, cached = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            encode_frames(encoder, frame_ids, data._loader, None, progress=False)
            fresh.append(time.perf_counter() - t)
            t = time.perf_counter()
            encode_frames(encoder, frame_ids, data._loader, cache, progress=False,
                          key_of=data.cache_key)
            cached.append(time.perf_counter() - t)
    f, c = statistics.median(fresh), statistics.median(cached)
    return {"frames": len(frame_ids), "load_and_encode_s": f, "from_cache_s": c,
            "ratio": c / f}


def run(model: str | None, store: str | None, n: int, batch_size: int, rounds: int) -> dict:
    from adapt.data import dataset_features
    from adapt.prepare import PrepareConfig, ensure_encoders, ensure_world
    from mpnp.llm import llm_fingerprint, load_llm
    from mpnp.paths import model_store_dir
    from scenes.dataset import QADataset

    store_dir = model_store_dir(store)
    prep = PrepareConfig()
    world = ensure_world(prep.world, store_dir)
    encoders = ensure_encoders(prep, world, store_dir)
    night = QADataset.load(world, "train").filter(night=True)
    frame_ids = sorted({q.frame_id for q in night.items})[:batch_size]
    camera = encoders["camera"]
    subset = QADataset([q for q in night.items if q.frame_id in frame_ids][:batch_size * 2],
                       {f: night.frame_info(f) for f in frame_ids}, night.frame, night.name)
    data = dataset_features(subset, {"camera": camera}, None, progress=False)
    spec = ModalitySpec("camera", camera.dim, camera.num_tokens)
    llm, tok = load_llm(model, store=store_dir)
    training = measure_training_savings(llm, tok, data, spec, n, batch_size, rounds)
    cache = measure_encoder_cache(camera, night, frame_ids, rounds)
    return {
        "meta": {"benchmark": "savings", "llm": llm_fingerprint(llm), "N": n,
                 "batch": batch_size, "rounds": rounds, "platform": platform.platform(),
                 "torch_threads": torch.get_num_threads()},
        "training_step": training,
        "encoder_cache": cache,
    }


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    out = [f"# mpnp bench savings — N={meta['N']}, batch {meta['batch']}, "
           f"{meta['llm']['num_layers']}-block {meta['llm']['model_type']}", "",
           "One mPnP training step (forward + backward) with and without each saving; "
           "FLOPs counted, time = median of interleaved rounds.", "",
           "| variant | GFLOPs/step | vs paper's cost | step s | vs paper's cost |",
           "|---|---|---|---|---|"]
    for name, r in result["training_step"].items():
        out.append(f"| {name} | {r['step_flops'] / 1e9:.1f} | {r['flops_vs_paper']:.2f} | "
                   f"{r['step_s']:.2f} | {r['time_vs_paper']:.2f} |")
    if BF16_VARIANT not in result["training_step"]:
        out += ["", "This device has no bfloat16 matrix units: bfloat16 autocast was not "
                "measured (the trainer's `autocast=\"auto\"` leaves it off here)."]
    c = result["encoder_cache"]
    out += ["", f"Encoder outputs for {c['frames']} frames (camera): load + encode "
            f"{c['load_and_encode_s']:.2f} s, from the feature cache {c['from_cache_s']:.3f} s "
            f"({c['ratio']:.3f}×)."]
    return "\n".join(out) + "\n"


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("savings", help="what lower-block replay, answer-only logits, "
                             "bfloat16 autocast and the encoder cache save per training "
                             "step")
    p.add_argument("--model", help="LLM directory or .gguf (default: embedded SmolLM2)")
    p.add_argument("--store")
    p.add_argument("--num-blocks", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from bench.cli import write_output

    if args.num_blocks < 1 or args.batch < 1 or args.rounds < 1:
        raise ValueError("--num-blocks, --batch and --rounds must be >= 1")
    result = run(args.model, args.store, args.num_blocks, args.batch, args.rounds)
    md = to_markdown(result)
    print(md)
    write_output(args.json, json.dumps(result, indent=2))
    write_output(args.markdown, md)
    return 0
