"""``mpnp demo``: the daemon, a simulated vehicle driving day -> dusk -> night, and a querier.

On the embedded SmolLM2 with the offline stage's encoders and day-camera state (the full
``mpnp prepare`` in the model store, built first if missing; with ``--quick`` and no full
stage there, the quick one of :meth:`adapt.prepare.PrepareConfig.quick` in
``<model store>/demo-quick/`` — :mod:`daemon.offline_stage`):

1. the daemon starts with a fresh store (so the night really has to be adapted to) and the
   simulated vehicle publishes six camera views (~12 Hz) and LiDAR (~20 Hz);
2. a querier asks the vehicle's own ground-truth questions about the live frames throughout
   and scores the answers;
3. at dusk the light-level policy switches to LiDAR; the daemon plans N and the steps from the
   simulated Orin's power mode, adapts between queries, and the operator drops the power mode
   once mid-run (the run is re-planned);
4. the candidate replaces the camera state only if it validates better on held-out night data.

The report (JSON + Markdown) has the accuracy per phase before/after, what was adapted with
which N, measured FLOPs, time, an energy estimate and query latency; the PNG timeline shows
light level, modality set, accuracy and power mode.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.client import Client, DaemonError, DaemonTimeout
from daemon.config import DaemonConfig
from daemon.sim_vehicle import SimVehicle, SimVehicleConfig

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Demo timing and sizes.

    ``quick`` shrinks the adaptation to fit ~5-6 min on 2 cores, and where the model store
    has no full offline stage it builds (once) and uses the quick one in a sub-store
    instead of running the full ``mpnp prepare``
    (:func:`daemon.offline_stage.choose_offline_stage`).
    """

    out_dir: str = "demo-out"
    model_store: str = ""
    quick: bool = False
    day_s: float = 25.0
    dusk_s: float = 10.0
    after_s: float = 60.0
    max_s: float = 540.0
    query_interval_s: float = 2.0
    camera_hz: float = 12.0
    lidar_hz: float = 20.0
    target_steps: int = 80
    batch_size: int = 4
    val_questions: int = 48
    eval_chunk: int = 4
    train_questions: int = 0
    power_switch_to: str = "MODE_15W"
    night_modalities: tuple[str, ...] = ("lidar",)
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quick:
            self.target_steps = min(self.target_steps, 10)
            self.val_questions = min(self.val_questions, 16)
            self.after_s = min(self.after_s, 20.0)
            self.max_s = min(self.max_s, 360.0)
        for name in ("day_s", "dusk_s", "after_s", "max_s", "query_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"demo {name} must be > 0, got {getattr(self, name)}")


class DemoFrameSource:
    """Synthetic-world frames for the vehicle; remembers each frame's questions and light."""

    def __init__(self, world_config: dict[str, Any], keep: int = 64) -> None:
        from scenes.synthetic import SyntheticWorld, WorldConfig

        allowed = {k: v for k, v in world_config.items() if k != "extra"}
        for key in ("day_light", "night_light"):
            if key in allowed:
                allowed[key] = tuple(allowed[key])
        self.config = WorldConfig(**allowed)
        self.world = SyntheticWorld(self.config)
        self.keep = keep
        self.lock = threading.Lock()
        self.frames: OrderedDict[str, tuple[list, float]] = OrderedDict()
        self.light = 1.0

    def frame(self, index: int, light: float):
        per_scene = self.config.frames_per_scene
        frame, items = self.world.make_frame(f"sim-{index // per_scene:04d}", index % per_scene,
                                             light)
        with self.lock:
            self.frames[frame.frame_id] = (items, light)
            while len(self.frames) > self.keep:
                self.frames.popitem(last=False)
            self.light = light
        return frame

    def recent(self, skip_newest: int | None = None) -> tuple[str, list, float] | None:
        """A frame the vehicle has sent: the newest ``skip_newest`` rendered ones are skipped
        (default: the vehicle's render-ahead frames and the one being sent, which may not
        have arrived yet)."""
        if skip_newest is None:
            from daemon.sim_vehicle import RENDER_AHEAD

            skip_newest = RENDER_AHEAD + 1
        with self.lock:
            items = list(self.frames.items())
        if len(items) <= skip_newest:
            return None
        frame_id, (qa, light) = items[-1 - skip_newest]
        return frame_id, qa, light


def _world_config(data_dir: Path) -> dict[str, Any]:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return dict(manifest["config"])


def _daemon_config(cfg: DemoConfig, run_dir: Path, cost, ipc: Path) -> DaemonConfig:
    """Loopback-free ipc endpoints, a fresh store, a simulated Orin scaled to this run.

    The simulated Orin's throughput is scaled so that, at MODE_30W, the target steps fit the
    deadline at N = 12 of 30 blocks: the planner then has a real choice of N, and the power
    switch mid-run really changes the capacity it re-plans with.
    """
    deadline = cfg.max_s * 0.8
    sample_12 = cost.sample_flops(min(12, cost.num_layers))
    needed = cfg.target_steps * cfg.batch_size * sample_12 / (0.8 * deadline)
    from policies.power_sim import ORIN_MODES

    mode_30w = next(m for m in ORIN_MODES if m.name == "MODE_30W").flops_per_s
    return DaemonConfig.from_dict({
        "endpoints": {"ingest": f"ipc://{ipc}/ingest", "query": f"ipc://{ipc}/query",
                      "events": f"ipc://{ipc}/events", "metrics": "127.0.0.1:0",
                      "ingest_queue": 64},
        "store": {"path": str(run_dir / "store"), "memory_budget_mb": 512},
        "policy": {"name": "light-level",
                   "options": {"dwell_s": 2.0, "night_modalities": list(cfg.night_modalities)}},
        "power": {"monitor": "sim-orin", "poll_interval_s": 0.5,
                  "options": {"initial_mode": "MODE_30W", "switch_delay_s": 0.5,
                              "flops_scale": needed * 1.02 / mode_30w}},
        "adaptation": {"deadline_s": deadline, "batch_size": cfg.batch_size,
                       "target_steps": cfg.target_steps, "min_steps": 2, "progress_every": 1},
        "limits": {"max_batch": 4, "frame_history": 64},
    })


class _Querier(threading.Thread):
    """Asks a ground-truth question about a recent frame every ``interval`` seconds."""

    def __init__(self, endpoint: str, source: DemoFrameSource, interval: float, t0: float,
                 seed: int) -> None:
        super().__init__(name="demo-querier", daemon=True)
        self.endpoint, self.source, self.interval, self.t0 = endpoint, source, interval, t0
        self.rng = random.Random(seed)
        self.records: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from mpnp.answers import exact_match

        with Client(self.endpoint, timeout_s=120) as client:
            while not self.stop.wait(self.interval):
                recent = self.source.recent()
                if recent is None:
                    continue
                frame_id, items, light = recent
                if not items:
                    continue
                item = self.rng.choice(items)
                sent = time.monotonic()
                try:
                    reply = client.ask(item.question, frame_id)
                except (DaemonError, DaemonTimeout) as exc:
                    log.info("query failed: %s", exc)
                    continue
                self.records.append({
                    "t": sent - self.t0, "light": light, "question": item.question,
                    "expected": item.answer, "answer": reply["answer"],
                    "correct": bool(exact_match(reply["answer"], item.answer)),
                    "modalities": reply["modalities"], "generation": reply["state_generation"],
                    "latency_s": time.monotonic() - sent, "daemon_latency_s": reply["latency_s"],
                })


def _phase(record: dict[str, Any], night_below: float = 0.25) -> str:
    if record["light"] >= night_below:
        return "day (camera)" if record["modalities"] == ["camera"] else "day (other)"
    if record["modalities"] == ["camera"]:
        return "night, camera state (before/while adapting)"
    return f"night, {'+'.join(record['modalities'])} state (after adapting)"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run_demo(cfg: DemoConfig, progress=print) -> dict[str, Any]:
    """Run the demo; returns the report (also written to ``cfg.out_dir``)."""
    from daemon.mpnp_backend import create_mpnp_backend
    from daemon.server import Daemon

    wall0 = time.monotonic()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=out))
    from daemon.offline_stage import choose_offline_stage

    offline = choose_offline_stage(cfg.model_store or None, cfg.quick)
    for line in offline_stage_message(offline):
        progress(line)
    progress(f"[demo] loading SmolLM2, encoders and the day-camera state ({offline.stage} "
             f"offline stage in {offline.store})...")
    backend = create_mpnp_backend(model_store=cfg.model_store, offline_store=str(offline.store),
                                  offline_stage=offline.stage,
                                  val_questions=cfg.val_questions,
                                  eval_chunk=cfg.eval_chunk, train_questions=cfg.train_questions,
                                  seed=cfg.seed, threads=cfg.threads)
    load_s = time.monotonic() - wall0
    progress(f"[demo] model resident after {load_s:.1f}s; offline day state: day accuracy "
             f"{backend.prepared.record.get('day_accuracy', float('nan')):.3f}, night "
             f"{backend.prepared.record.get('night_accuracy', float('nan')):.3f}")
    ipc = Path(tempfile.mkdtemp(prefix="mpnp-demo-"))
    config = _daemon_config(cfg, run_dir, backend.cost_model(), ipc)
    daemon = Daemon(config, backend)
    thread = threading.Thread(target=daemon.run, name="demo-daemon", daemon=True)
    thread.start()
    if not daemon.ready.wait(120):
        raise RuntimeError("the daemon did not become ready")
    source = DemoFrameSource(_world_config(backend.prepared.data_dir))
    from scenes.sensors import get_sensor

    # any other sensor the policy may ask for is sent at its descriptor's nominal rate
    others = {m: get_sensor(m).rate_hz for m in cfg.night_modalities
              if m not in ("camera", "lidar")}
    vehicle_cfg = SimVehicleConfig(
        endpoint=daemon.endpoints["ingest"], camera_hz=cfg.camera_hz, lidar_hz=cfg.lidar_hz,
        sensors_hz=others, day_s=cfg.day_s, dusk_s=cfg.dusk_s, night_s=cfg.max_s, loop=False,
    )
    stop_vehicle = threading.Event()
    vehicle = SimVehicle(vehicle_cfg, source)
    vehicle_stats: list = []
    vehicle_thread = threading.Thread(target=lambda: vehicle_stats.append(
        vehicle.run(stop_vehicle)), name="demo-vehicle", daemon=True)
    t0 = time.monotonic()
    vehicle_thread.start()
    querier = _Querier(daemon.endpoints["query"], source, cfg.query_interval_s, t0, cfg.seed)
    querier.start()
    timeline: list[dict[str, Any]] = []
    switched_power = False
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    last_line = ""
    try:
        with Client(daemon.endpoints["query"], timeout_s=120) as client:
            while time.monotonic() - t0 < cfg.max_s:
                status = client.status()
                t = time.monotonic() - t0
                run = status["adaptation"]
                power = status["power"]
                timeline.append({
                    "t": t, "light": source.light, "policy_light": status["policy"].get("light"),
                    "serving": status["serving"]["modalities"], "desired": status["desired"],
                    "adapting": run is not None, "progress": run["progress"] if run else None,
                    "phase": run["phase"] if run else None,
                    "mode": power["mode"]["name"] if power["mode"] else None,
                    "watts": (power["reading"] or {}).get("watts"),
                })
                if run and not switched_power and run["steps_done"] >= max(
                        1, run["steps_planned"] // 3):
                    reply = client.set_power_mode(cfg.power_switch_to)
                    switched_power = True
                    progress(f"[demo] t={t:5.1f}s operator switches the power mode to "
                             f"{reply['target']}: {reply['status']}")
                if result is None and status["last_adaptation"]:
                    result = status["last_adaptation"]
                    finished_at = t
                    progress(f"[demo] t={t:5.1f}s adaptation {result['outcome']}: adapted "
                             f"{result['adapted_accuracy']} vs serving "
                             f"{result['serving_accuracy']} on held-out night data")
                line = _progress_line(t, source.light, status, len(querier.records))
                if line != last_line:
                    progress(line)
                    last_line = line
                if finished_at is not None and t - finished_at >= cfg.after_s:
                    break
                time.sleep(1.0)
            final_status = client.status()
    finally:
        querier.stop.set()
        stop_vehicle.set()
        querier.join(130)
        vehicle_thread.join(10)
        daemon.stop()
        thread.join(60)
    report = _report(cfg, timeline, querier.records, final_status, backend, result,
                     vehicle_stats[0] if vehicle_stats else None, load_s,
                     time.monotonic() - wall0, offline)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "demo_report.md").write_text(report_markdown(report))
    ad = report["adaptation"]
    plot_timeline(timeline, querier.records, out / "demo_timeline.png",
                  f"mPnP daemon demo: {ad['modalities']} adapted with N={ad['n_blocks']}, "
                  f"{ad['steps']} steps")
    progress(f"[demo] done in {report['wall_s']:.0f}s: {out / 'demo_report.md'}, "
             f"{out / 'demo_timeline.png'}")
    return report


def offline_stage_message(offline) -> list[str]:
    """The progress lines saying which offline stage a run uses (a
    :class:`daemon.offline_stage.OfflineChoice`) and, when it is built first, what is built,
    where, and about how long it takes."""
    from adapt.prepare import QUICK_ESTIMATE_MIN
    from daemon.offline_stage import offline_config

    if offline.prepared:
        note = (" (--quick and no full `mpnp prepare` in the model store: a small world and "
                "short training, a first look)" if offline.stage == "quick" else "")
        return [f"[demo] using the {offline.stage} offline stage prepared in "
                f"{offline.store}{note}"]
    what = offline_config(offline.stage).describe()
    if offline.stage == "quick":
        return [f"[demo] --quick: no full offline stage (`mpnp prepare`) in the model store "
                f"yet, so building the quick one first into {offline.store}: {what} — about "
                f"{QUICK_ESTIMATE_MIN} minutes on 2 cores, once (reused by the next --quick; a "
                f"first look, not the full stage: run `mpnp prepare` for that); the demo "
                f"itself follows (about 5-6 minutes)"]
    return [f"[demo] nothing prepared in the model store yet: running the offline stage "
            f"first into {offline.store} (`mpnp prepare`: {what} — about 30-45 minutes on 2 "
            f"cores, once; `mpnp demo --quick` builds a small one in minutes instead); the "
            f"demo itself follows"]


def _progress_line(t: float, light: float, status: dict[str, Any], queries: int) -> str:
    run = status["adaptation"]
    state = (f"adapting {'+'.join(run['modalities'])} N={run['n_blocks']} {run['phase']} "
             f"{run['steps_done']}/{run['steps_planned']}" if run else "serving")
    mode = status["power"]["mode"]["name"] if status["power"]["mode"] else "?"
    return (f"[demo] t={t:5.0f}s light {light:.2f} policy {status['policy'].get('state')} | "
            f"serving {'+'.join(status['serving']['modalities'])} | {state} | {mode} | "
            f"{queries} queries")


def _report(cfg: DemoConfig, timeline, records, status, backend, result, vehicle, load_s,
            wall_s, offline=None) -> dict[str, Any]:
    phases: dict[str, dict[str, Any]] = {}
    for record in records:
        phase = phases.setdefault(_phase(record), {"queries": 0, "correct": 0, "latency": []})
        phase["queries"] += 1
        phase["correct"] += record["correct"]
        phase["latency"].append(record["latency_s"])
    for phase in phases.values():
        phase["accuracy"] = phase["correct"] / phase["queries"]
        lat = phase.pop("latency")
        phase["latency_p50_s"] = _percentile(lat, 0.5)
        phase["latency_p99_s"] = _percentile(lat, 0.99)
    latencies = [r["latency_s"] for r in records]
    adapting = [row for row in timeline if row["adapting"]]
    energy = 0.0
    for a, b in zip(timeline, timeline[1:]):
        if a["adapting"] and a["watts"] is not None:
            energy += a["watts"] * (b["t"] - a["t"])
    cost = backend.last_report or {}
    decisions = status["budget"]["decisions"]
    return {
        "config": asdict(cfg),
        "wall_s": wall_s,
        "model_load_s": load_s,
        "offline_stage": None if offline is None else {
            **offline.to_dict(), "data_dir": str(backend.prepared.data_dir),
            "config_digest": backend.prepared.record.get("config_digest")},
        "offline_day_state": {k: backend.prepared.record.get(k)
                              for k in ("day_accuracy", "night_accuracy", "num_blocks")},
        "phases": phases,
        "adaptation": {
            "result": result,
            "modalities": cost.get("modalities"),
            "n_blocks": cost.get("n_blocks"),
            "steps": cost.get("steps"),
            "samples": cost.get("samples"),
            "measured_flops": cost.get("flops"),
            "wall_s": cost.get("wall_s"),
            "seconds_adapting_in_timeline": (adapting[-1]["t"] - adapting[0]["t"]
                                             if adapting else 0.0),
            "energy_estimate_j": energy,
            "planned_energy_j": decisions[-1]["est_energy_j"] if decisions else None,
            "budget_decisions": decisions,
        },
        "queries": {"count": len(records), "p50_s": _percentile(latencies, 0.5),
                    "p95_s": _percentile(latencies, 0.95), "p99_s": _percentile(latencies, 0.99),
                    "mean_s": statistics.fmean(latencies) if latencies else None},
        "counters": status["counters"],
        "vehicle": (None if vehicle is None else
                    {"camera_sent": vehicle.camera_sent, "lidar_sent": vehicle.lidar_sent,
                     "sensors_sent": dict(vehicle.sensors_sent), "dropped": vehicle.dropped,
                     "elapsed_s": vehicle.elapsed_s,
                     **vehicle.rates()}),
        "power_modes": sorted({row["mode"] for row in timeline if row["mode"]}),
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    ad = report["adaptation"]
    result = ad["result"] or {}
    lines = [
        "# mPnP daemon demo", "",
        f"Wall time {report['wall_s']:.0f} s (model load {report['model_load_s']:.1f} s).", "",
        "## Accuracy per phase (live queries, ground truth from the simulated world)", "",
        "| phase | queries | accuracy | p50 latency (s) | p99 latency (s) |",
        "|---|---|---|---|---|",
    ]
    for name, phase in report["phases"].items():
        lines.append(f"| {name} | {phase['queries']} | {phase['accuracy']:.3f} | "
                     f"{phase['latency_p50_s']:.3f} | {phase['latency_p99_s']:.3f} |")
    off = report["offline_day_state"]
    stage = report.get("offline_stage")
    lines += [""]
    if stage:
        note = (" (the quick offline stage of `mpnp demo --quick`: a small world and short "
                "training, a first look, not the full `mpnp prepare`)"
                if stage["stage"] == "quick" else "")
        lines.append(f"Offline stage: **{stage['stage']}**, from `{stage['store']}`"
                     f"{'' if stage['was_prepared'] else ', built by this run'}{note}.")
    lines += [
        f"Offline day-camera state on the world's test split: day "
        f"{_fmt(off['day_accuracy'])}, night {_fmt(off['night_accuracy'])}.",
        f"Held-out night validation at the end of the run: serving (camera) "
        f"{_fmt(result.get('serving_accuracy'))} vs adapted "
        f"{_fmt(result.get('adapted_accuracy'))} -> **{result.get('outcome')}**.",
        "", "## Adaptation", "",
        f"- modalities: {ad['modalities']}, N = {ad['n_blocks']} connected blocks",
        f"- steps: {ad['steps']} ({ad['samples']} samples), measured FLOPs "
        f"{(ad['measured_flops'] or 0):.3g}, wall time {(ad['wall_s'] or 0):.1f} s",
        f"- energy estimate (simulated Orin power x time adapting): "
        f"{ad['energy_estimate_j']:.0f} J (planner estimate {_fmt(ad['planned_energy_j'], 0)} J)",
        "", "Budget decisions:", "",
    ]
    for d in ad["budget_decisions"]:
        lines.append(f"- {d['mode']}: N={d['n_blocks']}, {d['steps']} steps, feasible "
                     f"{d['feasible']}, replan {d['replan']}: {d['reason']}")
    q = report["queries"]
    lines += ["", "## Queries", "",
              f"{q['count']} questions, latency p50 {_fmt(q['p50_s'])}, p95 "
              f"{_fmt(q['p95_s'])}, p99 {_fmt(q['p99_s'])} s (client round trip).", "",
              f"Counters: {json.dumps(report['counters'])}", ""]
    return "\n".join(lines)


def plot_timeline(timeline: list[dict[str, Any]], records: list[dict[str, Any]], path: Path,
                  title: str) -> None:
    """The drive's timeline PNG (the demo's and ``mpnp report``'s).

    ``timeline`` rows: ``t``, ``light`` (vehicle), ``policy_light`` (the policy's estimate),
    ``serving`` / ``desired`` (modality lists), ``adapting``, ``mode`` (power mode name),
    ``watts``; ``records`` (answered questions): ``t``, ``correct`` (``None`` where the
    ground truth is unknown: left out of the accuracy panel), ``latency_s``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not timeline:
        return
    nan = float("nan")
    t = [row["t"] for row in timeline]
    fig, axes = plt.subplots(5, 1, figsize=(11, 11), sharex=True)
    ax = axes[0]
    ax.plot(t, [row["light"] if row["light"] is not None else nan for row in timeline],
            label="vehicle light")
    ax.plot(t, [row["policy_light"] if row["policy_light"] is not None else nan
                for row in timeline], "--", label="policy estimate (luminance)")
    ax.set_ylabel("light level")
    ax.legend(loc="upper right")
    sets = sorted({"+".join(row["serving"]) for row in timeline}
                  | {"+".join(row["desired"]) for row in timeline})
    index = {name: i for i, name in enumerate(sets)}
    ax = axes[1]
    ax.step(t, [index["+".join(row["serving"])] for row in timeline], where="post",
            label="serving")
    ax.step(t, [index["+".join(row["desired"])] for row in timeline], ":", where="post",
            label="policy wants")
    ax.set_yticks(range(len(sets)), sets)
    ax.set_ylabel("modality set")
    ax.legend(loc="upper right")
    ax = axes[2]
    scored = [r for r in records if r.get("correct") is not None]
    if scored:
        xs = [r["t"] for r in scored]
        ys = [1.0 if r["correct"] else 0.0 for r in scored]
        window = 5
        rolling = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1])
                   for i in range(len(ys))]
        ax.scatter(xs, ys, s=8, alpha=0.4, label="query correct")
        ax.plot(xs, rolling, label=f"rolling accuracy ({window})")
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no ground truth", transform=ax.transAxes, ha="center",
                va="center", color="tab:gray")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax = axes[3]
    timed = [r for r in records if r.get("latency_s") is not None]
    if timed:
        ax.scatter([r["t"] for r in timed], [r["latency_s"] for r in timed], s=8,
                   color="tab:purple")
    ax.set_ylabel("answer latency (s)")
    ax = axes[4]
    modes = sorted({row["mode"] for row in timeline if row["mode"]})
    ax.step(t, [modes.index(row["mode"]) if row["mode"] else nan for row in timeline],
            where="post", color="tab:red")
    ax.set_yticks(range(len(modes)), modes)
    ax.set_ylabel("power mode")
    twin = ax.twinx()
    twin.plot(t, [row["watts"] if row["watts"] is not None else nan
                  for row in timeline], color="tab:gray", alpha=0.6)
    twin.set_ylabel("W")
    spans = [row["t"] for row in timeline if row["adapting"]]
    for axis in axes:
        if spans:
            axis.axvspan(min(spans), max(spans), color="tab:orange", alpha=0.12)
    axes[-1].set_xlabel("seconds into the drive (shaded: adapting)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
