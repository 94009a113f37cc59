"""``mpnp daemon``, ``mpnp client ...`` and ``mpnp sim-vehicle``."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

DEFAULT_QUERY = "tcp://127.0.0.1:5556"
DEFAULT_EVENTS = "tcp://127.0.0.1:5557"
DEFAULT_INGEST = "tcp://127.0.0.1:5555"

#: ``mpnp client`` exit codes (documented in PROTOCOL.md): scripts can tell a refused request
#: from a missing daemon from a mistyped command line.
EXIT_OK = 0
EXIT_DAEMON_ERROR = 1  # the daemon answered with an error reply
EXIT_USAGE = 2  # bad command line (argparse's code too)
EXIT_TIMEOUT = 3  # no reply in time: daemon down, or CURVE keys refused


def _client_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The client's global options; on each action too (``mpnp client status --json``),
    there with suppressed defaults so that they only override when given."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--endpoint", default=default(None),
                        help=f"query endpoint (default {DEFAULT_QUERY})")
    parser.add_argument("--events-endpoint", default=default(None),
                        help=f"events endpoint (default {DEFAULT_EVENTS})")
    parser.add_argument("--config", default=default(None),
                        help="take the endpoints (and CURVE) from a daemon config")
    parser.add_argument("--timeout", type=float, default=default(5.0),
                        help="seconds per request")
    parser.add_argument("--server-key", default=default(None),
                        help="CURVE: the server's public key file")
    parser.add_argument("--client-cert", default=default(None),
                        help="CURVE: this client's .key_secret certificate")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print raw JSON replies")


def add_client_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``client`` command (also the whole of the torch-free ``mpnp-client``)."""
    c = subparsers.add_parser("client", help="talk to a running daemon")
    _client_options(c, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _client_options(common, suppress=True)
    cs = c.add_subparsers(dest="client_command", metavar="ACTION", required=True)
    cs.add_parser("status", help="daemon status", parents=[common])
    cs.add_parser("ping", help="is the daemon there", parents=[common])
    ask = cs.add_parser("ask", help="ask a question about the latest (or a given) frame",
                        parents=[common])
    ask.add_argument("question")
    ask.add_argument("--frame-id")
    pm = cs.add_parser("power-mode", help="show or set the power mode", parents=[common])
    pm.add_argument("mode", nargs="?")
    mod = cs.add_parser("modality", help="auto (policy) or forced modality set",
                        parents=[common])
    mod.add_argument("mode", choices=["auto", "forced"])
    mod.add_argument("modalities", nargs="*")
    ad = cs.add_parser("adapt", help="start / stop / commit an adaptation", parents=[common])
    ad.add_argument("action", choices=["start", "stop", "commit"])
    ad.add_argument("--modalities", nargs="+")
    ad.add_argument("--force-commit", action="store_true")
    co = cs.add_parser("compose", help="compose stored single-modality states into one "
                                       "(training-free), validate, serve if better",
                       parents=[common])
    co.add_argument("modalities", nargs="+", help="two or more, e.g. camera lidar")
    co.add_argument("--method", choices=["auto", "naive", "naive-ab", "damc"],
                    help="default: the daemon's adaptation.compose_method")
    tune = co.add_mutually_exclusive_group()
    tune.add_argument("--finetune", action="store_true", default=None,
                      help="fine-tune from the composed state when the budget allows")
    tune.add_argument("--no-finetune", dest="finetune", action="store_false")
    co.add_argument("--force-commit", action="store_true")
    te = cs.add_parser("teach", help="store a question/answer pair about a held frame "
                       "(a live sample)", parents=[common])
    te.add_argument("frame_id")
    te.add_argument("question")
    te.add_argument("answer")
    te.add_argument("--context", help="data context (default: the policy's)")
    ob = cs.add_parser("objects", help="send a frame's object list (JSON file, '-' for "
                       "stdin; schema: PROTOCOL.md, Live samples)", parents=[common])
    ob.add_argument("frame_id")
    ob.add_argument("file")
    ob.add_argument("--questions-per-frame", type=int)
    ob.add_argument("--context")
    pl = cs.add_parser("pseudo-label", help="the serving state labels a held frame (live "
                       "samples)", parents=[common])
    pl.add_argument("frame_id")
    pl.add_argument("--questions-per-frame", type=int)
    pl.add_argument("--min-confidence", type=float)
    pl.add_argument("--context")
    cs.add_parser("store", help="list the store", parents=[common])
    ev = cs.add_parser("events", help="print events", parents=[common])
    ev.add_argument("--count", type=int, default=0, help="stop after N events (0: forever)")
    ev.add_argument("--wait", type=float, default=0, help="stop after S quiet seconds (0: never)")
    kg = cs.add_parser("keygen", help="create CURVE server and client certificates in DIR",
                       parents=[common])
    kg.add_argument("directory")
    c.set_defaults(func=cmd_client)
    return c


def client_main(argv: list[str] | None = None) -> int:
    """``mpnp-client ...``: the client alone, importable and runnable without torch."""
    import logging

    parser = argparse.ArgumentParser(prog="mpnp-client",
                                     description="talk to a running mPnP daemon")
    sub = parser.add_subparsers(dest="command")
    add_client_command(sub)
    args = parser.parse_args(["client", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING)
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"mpnp-client: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("daemon", help="run the mPnP daemon (serves until SIGTERM)")
    p.add_argument("--config", required=True, help="daemon config (.toml or .json)")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(func=cmd_daemon)

    add_client_command(subparsers)

    d = subparsers.add_parser("demo", help="daemon + simulated vehicle, day -> night, report")
    d.add_argument("--quick", action="store_true",
                   help="short adaptation (~5-6 min on 2 cores); with no `mpnp prepare` in "
                        "the model store, a quick offline stage (~3-6 min, once) in "
                        "<store>/demo-quick instead of the full one")
    d.add_argument("--out", default="demo-out", help="where the report and timeline go")
    d.add_argument("--model-store", default="", help="model store (default $MPNP_HOME)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--night-modalities", nargs="+", default=["lidar"],
                   help="what the light-level policy wants at night (lidar, camera lidar, "
                        "radar, ...)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch threads for the model (1 leaves a core to IO on 2 cores)")
    d.set_defaults(func=cmd_demo)

    s = subparsers.add_parser("sim-vehicle", help="publish simulated sensor frames")
    s.add_argument("--endpoint", default=DEFAULT_INGEST, help="the daemon's ingest endpoint")
    s.add_argument("--camera-hz", type=float, default=12.0)
    s.add_argument("--lidar-hz", type=float, default=20.0)
    s.add_argument("--sensor", action="append", default=[], metavar="NAME=HZ",
                   help="also send another registered sensor the frames carry, e.g. radar=13")
    s.add_argument("--duration", type=float, help="seconds (default: until interrupted)")
    s.add_argument("--day", type=float, default=20.0, help="seconds of daylight")
    s.add_argument("--dusk", type=float, default=10.0, help="seconds of dusk ramp")
    s.add_argument("--night", type=float, default=20.0, help="seconds of night")
    s.add_argument("--no-loop", action="store_true", help="stay at night at the end")
    s.add_argument("--send-ambient", action="store_true",
                   help="put the light level in the camera header (ambient light sensor)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    s.add_argument("--objects-every", type=int, default=0, metavar="K",
                   help="also send every K-th world frame's ground-truth object list as an "
                        "`objects` request (live samples; 0: never)")
    s.add_argument("--query-endpoint", default="tcp://127.0.0.1:5556",
                   help="the daemon's query endpoint (for --objects-every)")
    s.add_argument("--objects-context", help="data context of those samples (default: the "
                   "daemon's policy)")
    s.set_defaults(func=cmd_sim_vehicle)


def cmd_daemon(args: argparse.Namespace) -> int:
    from daemon.config import load_config

    config = load_config(args.config)
    if args.check:
        print(f"{args.config}: OK")
        return 0
    if config.log_format == "json":
        from daemon.logs import use_json_logs

        use_json_logs()
    from daemon.server import Daemon

    return Daemon(config).run()


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out_dir=args.out, model_store=args.model_store,
                                 quick=args.quick, seed=args.seed, threads=args.threads,
                                 night_modalities=tuple(args.night_modalities)))
    print((Path(args.out) / "demo_report.md").read_text())
    return 0 if report["adaptation"]["result"] else 1


def _client_settings(args: argparse.Namespace) -> dict[str, Any]:
    query, events = DEFAULT_QUERY, DEFAULT_EVENTS
    server_key, client_cert = args.server_key, args.client_cert
    if args.config:
        from daemon.config import load_config

        cfg = load_config(args.config)
        query, events = cfg.endpoints.query, cfg.endpoints.events
    return {
        "query": args.endpoint or query,
        "events": args.events_endpoint or events,
        "server_key": server_key,
        "client_cert": client_cert,
    }


def _print(args: argparse.Namespace, body: Any, human: str | None = None) -> None:
    if args.json or human is None:
        print(json.dumps(body, indent=2, sort_keys=True, default=str))
    else:
        print(human)


def cmd_client(args: argparse.Namespace) -> int:
    from daemon.client import Client, DaemonError, DaemonTimeout, EventSubscriber

    action = args.client_command
    if action == "keygen":
        from daemon.security import generate_keys

        for name, (public, secret) in generate_keys(args.directory).items():
            print(f"{name}: public {public}  secret {secret}")
        return 0
    settings = _client_settings(args)
    curve = {"server_key": settings["server_key"], "client_cert": settings["client_cert"]}
    if action == "events":
        with EventSubscriber(settings["events"], **curve) as sub:
            seen = 0
            while args.count == 0 or seen < args.count:
                event = sub.receive(args.wait or 3600.0)
                if event is None:
                    break
                seen += 1
                print(json.dumps({"type": event[0].value, **event[1]}, default=str), flush=True)
        return 0
    try:
        with Client(settings["query"], timeout_s=args.timeout, **curve) as client:
            return _client_action(args, client)
    except DaemonError as exc:
        print(f"mpnp client: daemon error {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    except DaemonTimeout as exc:
        print(f"mpnp client: {exc} from {settings['query']} (is the daemon running? "
              "with CURVE, are the keys right?)", file=sys.stderr)
        return EXIT_TIMEOUT
    except ValueError as exc:  # a command line the daemon was never asked about
        print(f"mpnp client: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _client_action(args: argparse.Namespace, client: Any) -> int:
    action = args.client_command
    if action == "status":
        status = client.status()
        _print(args, status, format_status(status))
    elif action == "ping":
        _print(args, client.ping(), "pong")
    elif action == "ask":
        reply = client.ask(args.question, args.frame_id)
        _print(args, reply, f"{reply['answer']}    [{'+'.join(reply['modalities'])}, frame "
                            f"{reply['frame_id']}, {reply['latency_s'] * 1000:.1f} ms]")
    elif action == "power-mode":
        if args.mode:
            reply = client.set_power_mode(args.mode)
            _print(args, reply, f"{reply['target']}: {reply['status']} {reply['message']}")
        else:
            power = client.status()["power"]
            mode = power["mode"]["name"] if power["mode"] else "?"
            _print(args, power, f"{mode} (modes: {', '.join(power['modes'])}; "
                                f"monitor {power['monitor']})")
    elif action == "modality":
        if args.mode == "forced" and not args.modalities:
            raise ValueError("modality forced needs the modalities, e.g. `modality forced lidar`")
        reply = client.set_modality(args.mode, args.modalities or None)
        _print(args, reply, f"{reply['mode']}: desired {reply['desired']}, "
                            f"serving {reply['serving']}")
    elif action == "adapt":
        reply = client.adapt(args.action, args.modalities,
                             True if args.force_commit else None)
        _print(args, reply)
    elif action == "compose":
        reply = client.compose(args.modalities, args.method, args.finetune,
                               True if args.force_commit else None)
        info = reply["composition"]
        lambdas = info.get("lambdas")
        _print(args, reply, f"composed {'+'.join(sorted(args.modalities))} from "
                            f"{', '.join(i['name'] for i in info['inputs'])} by "
                            f"{info['method']}"
                            + (f" (λ {', '.join(f'{x:g}' for x in lambdas)})" if lambdas else "")
                            + f" in {_seconds(info.get('compose_wall_s'))}; validating (see "
                              "status / compose.finished)")
    elif action in ("teach", "objects", "pseudo-label"):
        if action == "teach":
            reply = client.teach(args.frame_id, args.question, args.answer, args.context)
        elif action == "objects":
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            try:
                objects = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{args.file}: not JSON: {exc}") from None
            reply = client.objects(args.frame_id, objects, args.questions_per_frame,
                                   args.context)
        else:
            reply = client.pseudo_label(args.frame_id, args.questions_per_frame,
                                        args.min_confidence, args.context)
        _print(args, reply, f"stored {reply['stored']} samples of frame {reply['frame_id']} "
                            f"in {reply['context']!r} ({reply['buffered']} buffered)")
    elif action == "store":
        store = client.list_store()
        _print(args, store, format_store(store))
    return EXIT_OK


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 1000:.0f} ms"


def format_status(status: dict[str, Any]) -> str:
    """``status`` for people (``--json`` prints the reply itself)."""
    serving = status.get("serving") or {}
    uptime = status.get("uptime_s") or 0
    lines = [f"mPnP daemon, protocol {status.get('protocol')}, up {uptime:.0f} s",
             f"serving     {'+'.join(serving.get('modalities') or []) or '-'} (state "
             f"generation {serving.get('generation')}); desired "
             f"{'+'.join(status.get('desired') or []) or '-'}"]
    policy = status.get("policy") or {}
    if policy:
        lines.append("policy      " + ", ".join(f"{k} {v}" for k, v in sorted(policy.items())
                                                if not isinstance(v, (dict, list))))
    run = status.get("adaptation")
    if run:
        lines.append(f"adapting    {'+'.join(run.get('modalities') or [])}: phase "
                     f"{run.get('phase')}, {run.get('steps_done')}/{run.get('steps_planned')} "
                     f"steps, loss {run.get('loss')}")
    composition = serving.get("composition")
    if composition:
        lines.append(f"composed    {composition.get('method')} of "
                     f"{', '.join(i['name'] for i in composition.get('inputs') or [])} in "
                     f"{_seconds(composition.get('compose_wall_s'))}, 0 training FLOPs")
    last = status.get("last_adaptation")
    if last:
        lines.append(f"last run    {last.get('outcome')} (adapted "
                     f"{last.get('adapted_accuracy')}, serving {last.get('serving_accuracy')})")
    power = status.get("power") or {}
    mode = (power.get("mode") or {}).get("name", "?")
    reading = power.get("reading") or {}
    lines.append(f"power       {mode} via {power.get('monitor')}; {reading.get('watts')} W")
    latency = status.get("latency") or {}
    lines.append(f"questions   {latency.get('count', 0)} answered; p50 "
                 f"{_seconds(latency.get('p50_s'))}, p95 {_seconds(latency.get('p95_s'))}, "
                 f"p99 {_seconds(latency.get('p99_s'))} (last {latency.get('window', 0)})")
    queue = status.get("queue") or {}
    if queue:
        lines.append(f"queue       {queue.get('pending')} pending from {queue.get('clients')} "
                     f"clients (max {queue.get('max_pending')}, "
                     f"{queue.get('max_per_client')} per client)")
    counters = status.get("counters") or {}

    def counts(values: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(values.items())) or "none"

    lines.append(f"frames in   {counts(counters.get('frames_in') or {})}")
    lines.append(f"dropped     {counts(counters.get('frames_dropped') or {})}")
    lines.append(f"errors      {counts(counters.get('errors') or {})}")
    for sensor, frame in sorted((status.get("frames") or {}).items()):
        if frame:
            lines.append(f"{sensor:<11} latest {frame['frame_id']} at {frame['timestamp']:.3f}, "
                         f"{frame['held']} held")
    store = status.get("store") or {}
    lines.append(f"store       {store.get('root')} ({store.get('entries')} entries)")
    return "\n".join(lines)


def format_store(store: dict[str, Any]) -> str:
    """``list_store`` for people: one line per entry."""
    rows = [f"store {store.get('root')}: {len(store.get('entries', []))} entries, "
            f"{store.get('memory_used', 0) / 2**20:.1f} of "
            f"{store.get('memory_budget', 0) / 2**20:.0f} MiB loaded"]
    loaded = set(store.get("loaded") or [])
    for entry in store.get("entries", []):
        meta = entry.get("meta") or {}
        what = "+".join(meta.get("modalities") or []) or meta.get("modality") or ""
        rows.append(f"  {entry['name']:<24} {entry['kind']:<8} {entry['bytes'] / 2**20:8.2f} MiB "
                    f"gen {entry.get('generation', 0):<4} {what:<14} "
                    f"{'loaded' if entry['name'] in loaded else ''}".rstrip())
    return "\n".join(rows)


def cmd_sim_vehicle(args: argparse.Namespace) -> int:
    from daemon.sim_vehicle import SimVehicle, SimVehicleConfig, SyntheticFrameSource

    sensors_hz = {}
    for item in args.sensor:
        name, _, hz = item.partition("=")
        try:
            sensors_hz[name] = float(hz)
        except ValueError:
            print(f"--sensor expects NAME=HZ, got {item!r}", file=sys.stderr)
            return 2
    config = SimVehicleConfig(
        endpoint=args.endpoint, camera_hz=args.camera_hz, lidar_hz=args.lidar_hz,
        sensors_hz=sensors_hz, duration_s=args.duration, day_s=args.day, dusk_s=args.dusk,
        night_s=args.night,
        loop=not args.no_loop, send_ambient=args.send_ambient,
        objects_every=args.objects_every, query_endpoint=args.query_endpoint,
        objects_context=args.objects_context,
    )
    options: dict[str, Any] = {}
    if args.image_size:
        options.update(image_height=args.image_size[0], image_width=args.image_size[1])
    source = SyntheticFrameSource(seed=args.seed, **options)
    stop = threading.Event()
    try:
        stats = SimVehicle(config, source).run(stop)
    except KeyboardInterrupt:
        stop.set()
        return 130
    rates = stats.rates()
    others = "".join(f"{sent} {name} ({rates[f'{name}_hz']:.1f} Hz), "
                     for name, sent in stats.sensors_sent.items())
    print(f"sent {stats.camera_sent} camera ({rates['camera_hz']:.1f} Hz), {stats.lidar_sent} "
          f"lidar ({rates['lidar_hz']:.1f} Hz), {others}{stats.dropped} dropped, "
          f"{stats.world_frames} world frames ({stats.late_frames} late) in {stats.elapsed_s:.1f}s")
    if config.objects_every:
        print(f"sent {stats.objects_sent} object lists ({stats.samples_stored} live samples "
              f"stored), {stats.objects_failed} refused or dropped")
    return 0
