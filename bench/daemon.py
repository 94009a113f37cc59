"""``mpnp bench daemon``: the daemon under load, on the embedded SmolLM2 (real backend).

Measures, against the targets of the daemon issue:

- query latency p50/p99 idle and while an adaptation runs (client round trip, sequential
  questions about live frames); target: p50 idle <= 200 ms, p99 during adaptation <= 3x idle;
- sustained ingest vs offered rate: a vehicle publishing pre-rendered frames at 1x, 2x, 4x the
  realistic rates (six cameras 12 Hz, LiDAR 20 Hz), accepted/dropped counts by reason and the
  process memory over time (flat = no growth); target: the full rate sustained, flat memory;
- Reconnect latency: switching the serving modality set to one whose adapted state is in the
  store (load the state + its encoder from the store, connect), with the encoders evicted
  first (cold) and loaded (warm); target <= 1 s.
- Compose latency: the ``compose`` command building camera + LiDAR from the stored camera and
  LiDAR states (NaiveMC and DAMC with its λ search), from the request to the reply (the state
  is built) and to the gate's decision (validated on held-out questions, served).

The daemon runs in-process (one engine loop, its IO threads) so memory is this process's RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TARGETS = {"query_p50_idle_s": 0.200, "adapt_p99_over_idle": 3.0, "reconnect_s": 1.0}


def add_bench_command(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("daemon", help="daemon query latency, ingest, Reconnect")
    p.add_argument("--model-store", default="", help="model store (default $MPNP_HOME)")
    p.add_argument("--queries", type=int, default=100,
                   help="questions per latency phase (p99 needs ~100)")
    p.add_argument("--ingest-seconds", type=float, default=20.0, help="seconds per offered rate")
    p.add_argument("--rates", default="1,2,4", help="offered-rate multipliers")
    p.add_argument("--reconnects", type=int, default=3, help="Reconnect round trips per kind")
    p.add_argument("--quick", action="store_true", help="fewer queries, shorter ingest")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the model (1 leaves a core to IO on 2 cores)")
    p.add_argument("--json", type=Path, help="write the result JSON here")
    p.add_argument("--markdown", type=Path, help="write the Markdown table here")
    p.set_defaults(func=_run)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def _latency(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "p50_s": _percentile(values, 0.5),
            "p99_s": _percentile(values, 0.99), "max_s": max(values) if values else None,
            "mean_s": statistics.fmean(values) if values else None}


class _FrameCycle:
    """Pre-rendered world frames, so the offered rate is not limited by rendering."""

    def __init__(self, source, count: int = 6) -> None:
        self.frames = [source.frame(i, 1.0) for i in range(count)]
        self.qa = {f.frame_id: source.frames[f.frame_id][0] for f in self.frames}

    def frame(self, index: int, light: float):
        return self.frames[index % len(self.frames)]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from daemon.client import Client, SensorPublisher
    from daemon.config import DaemonConfig
    from daemon.demo import DemoFrameSource, _world_config
    from daemon.mpnp_backend import create_mpnp_backend
    from daemon.server import Daemon
    from daemon.sim_vehicle import SimVehicle, SimVehicleConfig

    queries = 8 if args.quick else args.queries
    ingest_s = 8.0 if args.quick else args.ingest_seconds
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    started = time.monotonic()
    backend = create_mpnp_backend(model_store=args.model_store, val_questions=8, eval_chunk=2,
                                  threads=args.threads)
    load_s = time.monotonic() - started
    run_dir = Path(tempfile.mkdtemp(prefix="mpnp-bench-daemon-"))
    config = DaemonConfig.from_dict({
        "endpoints": {"ingest": "tcp://127.0.0.1:*", "query": "tcp://127.0.0.1:*",
                      "events": "tcp://127.0.0.1:*", "metrics": ""},
        "store": {"path": str(run_dir / "store")},
        "policy": {"name": "fixed", "options": {"modalities": ["camera"]}},
        # A generous simulated budget: the run connects N = 12 blocks (as the offline state)
        # and lasts as long as the latency measurement needs.
        "power": {"monitor": "sim-orin", "options": {"switch_delay_s": 0.0,
                                                     "flops_scale": 100.0}},
        "adaptation": {"auto": False, "batch_size": 4, "target_steps": 5_000, "min_steps": 1,
                       "deadline_s": 3600, "n_max": 12, "progress_every": 50},
    })
    daemon = Daemon(config, backend)
    thread = threading.Thread(target=daemon.run, name="bench-daemon", daemon=True)
    thread.start()
    if not daemon.ready.wait(120):
        raise RuntimeError("the daemon did not become ready")
    source = DemoFrameSource(_world_config(backend.prepared.data_dir))
    cycle = _FrameCycle(source)
    result: dict[str, Any] = {"model_load_s": load_s, "targets": TARGETS,
                              "threads": args.threads, "llm": backend.config.llm}
    try:
        with Client(daemon.endpoints["query"], timeout_s=300) as client, \
                SensorPublisher(daemon.endpoints["ingest"], hwm=16) as publisher:
            def feed() -> None:
                for frame in cycle.frames:
                    publisher.send_camera(frame, time.time())
                    publisher.send_lidar(frame, time.time())

            def ask_all(n: int, gap_s: float) -> list[float]:
                out = []
                for i in range(n):
                    frame = cycle.frames[i % len(cycle.frames)]
                    publisher.send_camera(frame, time.time())
                    publisher.send_lidar(frame, time.time())
                    item = cycle.qa[frame.frame_id][i % len(cycle.qa[frame.frame_id])]
                    time.sleep(gap_s)
                    sent = time.monotonic()
                    client.ask(item.question, frame.frame_id)
                    out.append(time.monotonic() - sent)
                return out

            feed()
            time.sleep(0.5)
            ask_all(3, 0.05)  # warm-up
            idle = ask_all(queries, 0.2)
            result["query_idle"] = _latency(idle)
            print(f"idle: {result['query_idle']}", flush=True)
            client.adapt("start", ["lidar"])
            while client.status()["adaptation"]["phase"] == "baseline":
                time.sleep(0.5)
            during = ask_all(queries, 0.5)
            status = client.status()
            result["query_during_adaptation"] = {
                **_latency(during), "adaptation": status["adaptation"],
                "adaptation_cost": status["adaptation_cost"]}
            print(f"during adaptation: {_latency(during)}", flush=True)
            result["ingest_during_adaptation"] = _ingest(
                daemon, SimVehicle, SimVehicleConfig, cycle, 1.0, ingest_s)
            client.adapt("stop")
            result["ingest"] = [_ingest(daemon, SimVehicle, SimVehicleConfig, cycle, rate,
                                        ingest_s) for rate in rates]
            for row in result["ingest"]:
                print(f"ingest {row['offered_multiplier']}x: {row}", flush=True)
            result["reconnect"] = _reconnect(daemon, client, backend, args.reconnects)
            print(f"reconnect: {result['reconnect']}", flush=True)
            result["compose"] = _compose(client)
            print(f"compose: {result['compose']}", flush=True)
    finally:
        daemon.stop()
        thread.join(60)
    idle_q, adapt_q = result["query_idle"], result["query_during_adaptation"]
    result["verdict"] = {
        "query_p50_idle_ok": idle_q["p50_s"] <= TARGETS["query_p50_idle_s"],
        "adapt_p99_over_idle_p99": adapt_q["p99_s"] / idle_q["p99_s"],
        "adapt_p99_over_idle_p50": adapt_q["p99_s"] / idle_q["p50_s"],
        "adapt_p99_ok": adapt_q["p99_s"] <= TARGETS["adapt_p99_over_idle"] * idle_q["p99_s"],
        "full_rate_sustained": result["ingest"][0]["accepted_fraction"] >= 0.95,
        "memory_flat": all(abs(r["rss_slope_mb_per_min"]) < 20 for r in result["ingest"]),
        "reconnect_ok": max(r["max_s"] for r in result["reconnect"].values())
        <= TARGETS["reconnect_s"],
    }
    return result


def _ingest(daemon, SimVehicle, SimVehicleConfig, cycle, rate: float, seconds: float):
    """Offer ``rate`` x the realistic sensor rates for ``seconds``; count and sample memory."""
    metrics = daemon.metrics
    before_in = metrics.frames_in.by_label("sensor")
    before_drop = metrics.frames_dropped.by_label("reason")
    config = SimVehicleConfig(endpoint=daemon.endpoints["ingest"], camera_hz=12.0 * rate,
                              lidar_hz=20.0 * rate, duration_s=seconds, world_interval_s=0.5,
                              hwm=16)
    vehicle = SimVehicle(config, cycle)
    memory: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(0.5):
            memory.append((time.monotonic() - t0, _rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stats = vehicle.run()
    time.sleep(0.5)  # let the engine drain
    stop.set()
    sampler.join()
    after_in = metrics.frames_in.by_label("sensor")
    after_drop = metrics.frames_dropped.by_label("reason")
    accepted = {k: after_in.get(k, 0) - before_in.get(k, 0) for k in after_in}
    dropped = {k: after_drop.get(k, 0) - before_drop.get(k, 0) for k in after_drop}
    sent = stats.camera_sent + stats.lidar_sent
    slope = 0.0
    if len(memory) >= 3:
        xs, ys = [m[0] for m in memory], [m[1] for m in memory]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(
            sum((x - mx) ** 2 for x in xs), 1e-9) * 60.0
    return {
        "offered_multiplier": rate,
        "offered_hz": {"camera": 12.0 * rate, "lidar": 20.0 * rate},
        "sent_hz": stats.rates(), "publisher_dropped": stats.dropped,
        "accepted": accepted, "dropped_by_daemon": {k: v for k, v in dropped.items() if v},
        "accepted_fraction": sum(accepted.values()) / max(sent, 1),
        "rss_mb_start": memory[0][1] if memory else None,
        "rss_mb_end": memory[-1][1] if memory else None,
        "rss_slope_mb_per_min": slope,
    }


def _reconnect(daemon, client, backend, rounds: int) -> dict[str, Any]:
    """Round trips of ``set_modality forced X``, served from the store (no adaptation)."""
    client.adapt("start", ["lidar"], force_commit=True)  # a lidar state for the store
    while (client.status()["adaptation"] or {}).get("steps_done", 1) < 1:
        time.sleep(0.5)
    client.adapt("commit")
    store = daemon.engine.store
    out: dict[str, list[float]] = {"cold": [], "warm": []}
    inner: list[float] = []
    for _ in range(rounds):
        for target in (["camera"], ["lidar"]):
            other = ["lidar"] if target == ["camera"] else ["camera"]
            for kind in ("cold", "warm"):
                client.set_modality("forced", other)  # a real switch each time
                if kind == "cold":
                    store.evict()  # the target's encoder must come from disk
                sent = time.monotonic()
                reply = client.set_modality("forced", target)
                elapsed = time.monotonic() - sent
                if reply["serving"] != target:
                    raise RuntimeError(f"Reconnect to {target} did not come from the store: "
                                       f"{reply}")
                out[kind].append(elapsed)
                inner.append(backend.reconnects[-1]["seconds"])
    client.set_modality("auto")
    return {"cold": _latency(out["cold"]), "warm": _latency(out["warm"]),
            "backend_load_state": _latency(inner)}


def _compose(client, methods: tuple[str, ...] = ("naive", "damc")) -> dict[str, Any]:
    """``compose camera lidar`` by each method, from the camera and LiDAR states that
    :func:`_reconnect` left in the store: request → reply (composed) → the gate's decision."""
    out: dict[str, Any] = {}
    for method in methods:
        client.set_modality("forced", ["camera"])
        before = (client.status().get("last_composition") or {}).get("time_to_decision_s")
        sent = time.monotonic()
        client.compose(["camera", "lidar"], method=method, finetune=False, force_commit=True)
        reply_s = time.monotonic() - sent
        deadline = time.monotonic() + 600.0
        while True:
            last = client.status().get("last_composition") or {}
            if last.get("time_to_decision_s") not in (None, before):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"compose by {method}: no decision within 600 s ({last})")
            time.sleep(0.05)
        decided_s = time.monotonic() - sent
        comp = last.get("composition") or last
        out[method] = {"reply_s": reply_s, "decision_s": decided_s,
                       "compose_s": comp.get("compose_s"),
                       "compose_wall_s": comp.get("compose_wall_s"),
                       "time_to_decision_s": last.get("time_to_decision_s"),
                       "search": comp.get("search"), "outcome": last.get("outcome"),
                       "adapted_accuracy": last.get("adapted_accuracy"),
                       "serving_accuracy": last.get("serving_accuracy")}
    client.set_modality("auto")
    return out


def markdown(result: dict[str, Any]) -> str:
    idle, during = result["query_idle"], result["query_during_adaptation"]
    v = result["verdict"]

    def ms(x):
        return "n/a" if x is None else f"{x * 1000:.0f} ms"

    lines = [
        "# Daemon benchmark (embedded SmolLM2, CPU)", "",
        "| measure | value | target | met |", "|---|---|---|---|",
        f"| query p50 idle | {ms(idle['p50_s'])} (p99 {ms(idle['p99_s'])}) | <= 200 ms | "
        f"{v['query_p50_idle_ok']} |",
        f"| query p99 during adaptation | {ms(during['p99_s'])} (p50 {ms(during['p50_s'])}); "
        f"{v['adapt_p99_over_idle_p99']:.1f}x idle p99, {v['adapt_p99_over_idle_p50']:.1f}x "
        f"idle p50 | <= 3x idle | {v['adapt_p99_ok']} |",
    ]
    for row in result["ingest"]:
        lines.append(
            f"| ingest {row['offered_multiplier']:g}x ({row['offered_hz']['camera']:g} Hz cam, "
            f"{row['offered_hz']['lidar']:g} Hz LiDAR) | sent {row['sent_hz']['camera_hz']:.1f}"
            f"/{row['sent_hz']['lidar_hz']:.1f} Hz, accepted {row['accepted_fraction']:.1%}, "
            f"daemon drops {row['dropped_by_daemon']}, publisher drops "
            f"{row['publisher_dropped']}, RSS {row['rss_mb_start']:.0f}->"
            f"{row['rss_mb_end']:.0f} MB ({row['rss_slope_mb_per_min']:+.1f} MB/min) | "
            "full rate, flat memory | "
            f"{row['accepted_fraction'] >= 0.95 and abs(row['rss_slope_mb_per_min']) < 20} |")
    row = result["ingest_during_adaptation"]
    lines.append(f"| ingest 1x during adaptation | accepted {row['accepted_fraction']:.1%}, "
                 f"daemon drops {row['dropped_by_daemon']} (stale frames dropped by design) | "
                 "bounded queues | - |")
    rc = result["reconnect"]
    lines += [
        f"| Reconnect (store -> serving), cold | p50 {ms(rc['cold']['p50_s'])}, max "
        f"{ms(rc['cold']['max_s'])} | <= 1 s | {v['reconnect_ok']} |",
        f"| Reconnect, warm | p50 {ms(rc['warm']['p50_s'])}, max {ms(rc['warm']['max_s'])} | "
        "<= 1 s | |",
    ]
    for method, row in (result.get("compose") or {}).items():
        search = row.get("search") or {}
        how = (f"incl. the λ search ({search.get('evaluations')} candidates × "
               f"{(search.get('questions') or 0) // max(search.get('evaluations') or 1, 1)} "
               "validation questions)" if search else f"backend {ms(row['compose_s'])}")
        target, met = ("well under 1 s", row["reply_s"] < 1.0) if not search else ("-", "")
        lines.append(
            f"| Compose camera + LiDAR ({method}) | composed in {ms(row['reply_s'])} ({how}), "
            f"served after validation in {ms(row['decision_s'])}, 0 training FLOPs | "
            f"{target} | {met} |")
    lines += [
        "", f"Model load: {result['model_load_s']:.1f} s. Machine: {result.get('machine', '')}",
        "",
    ]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    import os
    import platform

    from bench.cli import write_output

    result = run_bench(args)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"load average at the end {load}")
    text = json.dumps(result, indent=2, default=str)
    write_output(args.json, text)
    write_output(args.markdown, markdown(result))
    print(markdown(result))
    return 0
