"""``mpnp record``, ``mpnp replay`` and ``mpnp report``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from daemon.cli import DEFAULT_EVENTS, DEFAULT_INGEST, DEFAULT_QUERY

RECORD_HELP = """\
Record what a running daemon publishes, from outside: every event (context changes,
budget plans, adaptation progress and results, compositions, modality switches, power
modes, lifecycle) and a `status` sample every --status-interval seconds (policy light,
serving and wanted sets, power mode and watts, adaptation progress, counters, latency).

It cannot see sensor frames, nor the questions and answers of other clients: the ingest
socket delivers each frame to one reader (the daemon), and replies go only to the asker.
To record those too, set [recording] path = "DIR" in the daemon's config: the daemon then
records everything it received and did (sensor frames, questions, answers, control
commands, events, status) into DIR itself.
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    r = subparsers.add_parser("record", help="record a daemon's events and status to MCAP "
                                             "(sensor frames: the daemon's [recording])",
                              description=RECORD_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("out", help="directory for recording-NNNN.mcap files")
    _endpoint_options(r)
    r.add_argument("--status-interval", type=float, default=1.0, help="seconds between "
                   "status samples")
    r.add_argument("--duration", type=float, help="seconds (default: until interrupted)")
    r.add_argument("--max-bytes", type=int, default=512 * 2**20, help="rotate files at this "
                   "size")
    r.add_argument("--max-files", type=int, default=8, help="keep this many files (0: all)")
    r.set_defaults(func=cmd_record)

    p = subparsers.add_parser(
        "replay", help="play a recording (ours, ROS 2 MCAP or rosbag2) into a daemon",
        description="Send a recording's sensor messages to a daemon's ingest socket, each "
                    "checked with the protocol's own decoder first (what it would refuse "
                    "is named and not sent), and ask its recorded questions again, "
                    "comparing the answers. ROS 2 recordings (MCAP files or rosbag2 "
                    "directories with sensor_msgs/Image, CompressedImage, PointCloud2) need "
                    "a topic map (--map, see recording/ros2.py); no ROS installation needed.")
    p.add_argument("recording", help="recording file or directory, ROS 2 .mcap or rosbag2 "
                                     "directory")
    _endpoint_options(p)
    p.add_argument("--ingest-endpoint", help=f"the daemon's ingest endpoint (default "
                                             f"{DEFAULT_INGEST})")
    p.add_argument("--rate", default="1", help="1 (real time), N (N times faster) or max "
                                               "(as fast as the daemon takes them)")
    p.add_argument("--map", help="topic map (TOML) for ROS 2 recordings")
    p.add_argument("--no-questions", action="store_true", help="send sensor messages only")
    p.add_argument("--send-timeout", type=float, default=10.0,
                   help="seconds a sensor message may wait for room in the daemon's queue")
    p.add_argument("--json", help="write the replay's result here")
    p.set_defaults(func=cmd_replay)

    rep = subparsers.add_parser("report", help="field-test report of a recording: timeline "
                                               "PNG + Markdown")
    rep.add_argument("recording")
    rep.add_argument("--out", help="output directory (default: RECORDING-report)")
    rep.add_argument("--truth", help="ground truth, JSONL lines {question, answer[, "
                                     "frame_id]}: accuracy where known")
    rep.add_argument("--map", help="topic map (TOML) for ROS 2 recordings")
    rep.set_defaults(func=cmd_report)


def _endpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="take the endpoints and limits from a daemon config "
                                         "(CURVE: --server-key, --client-cert)")
    parser.add_argument("--endpoint", help=f"query endpoint (default {DEFAULT_QUERY})")
    parser.add_argument("--events-endpoint", help=f"events endpoint (default {DEFAULT_EVENTS})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--server-key", help="CURVE: the server's public key file")
    parser.add_argument("--client-cert", help="CURVE: this client's .key_secret certificate")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from daemon.config import DaemonConfig, load_config

    config = load_config(args.config) if args.config else DaemonConfig()
    default = not args.config
    return {
        "query": args.endpoint or (DEFAULT_QUERY if default else config.endpoints.query),
        "events": args.events_endpoint or (DEFAULT_EVENTS if default
                                           else config.endpoints.events),
        "ingest": getattr(args, "ingest_endpoint", None) or (
            DEFAULT_INGEST if default else config.endpoints.ingest),
        "limits": config.limits,
        "curve": {"server_key": args.server_key, "client_cert": args.client_cert},
    }


def _note(line: str) -> None:
    print(f"mpnp: {line}", file=sys.stderr, flush=True)


def cmd_record(args: argparse.Namespace) -> int:
    from daemon.client import Client, DaemonError, DaemonTimeout, EventSubscriber
    from mpnp import __version__
    from recording.writer import Recorder, RecordingSettings

    settings = _settings(args)
    recorder = Recorder(RecordingSettings(path=args.out, max_bytes=args.max_bytes,
                                          max_files=args.max_files,
                                          chunk_bytes=min(2**20, args.max_bytes),
                                          status_interval_s=args.status_interval),
                        library=f"mpnp {__version__} record")
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    deadline = None if args.duration is None else time.monotonic() + args.duration
    next_status = 0.0
    failures = 0
    try:
        with EventSubscriber(settings["events"], **settings["curve"]) as events, \
                Client(settings["query"], timeout_s=args.timeout, **settings["curve"]) as client:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + args.status_interval
                    try:
                        recorder.status(client.status())
                    except (DaemonError, DaemonTimeout) as exc:
                        failures += 1
                        if failures == 1:
                            _note(f"record: no status from {settings['query']}: {exc}")
                event = events.receive(min(0.1, args.status_interval))
                if event is not None:
                    recorder.event(event[0].value, event[1])
    finally:
        recorder.close()
    counters = recorder.counters()
    print(f"recorded {counters['written']} messages to {', '.join(counters['files']) or '-'} "
          f"in {args.out} ({sum(counters['dropped'].values())} dropped)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from daemon.client import Client, SensorPublisher
    from recording.reader import RecordingReader
    from recording.replay import parse_rate, replay
    from recording.ros2 import TopicMap

    rate = parse_rate(args.rate)
    settings = _settings(args)
    topic_map = TopicMap.load(args.map) if args.map else None
    reader = RecordingReader(Path(args.recording), topic_map, notice=_note)
    client = None if args.no_questions else Client(settings["query"], timeout_s=args.timeout,
                                                   **settings["curve"])
    try:
        with SensorPublisher(settings["ingest"], **settings["curve"]) as publisher:
            result = replay(reader, lambda parts: publisher.send_parts(parts, args.send_timeout),
                            client.ask if client is not None else None, rate,
                            settings["limits"], _note)
            time.sleep(0.2)  # let the last messages leave before the socket closes
    finally:
        if client is not None:
            client.close()
    print(result.summary())
    for difference in result.different[:10]:
        print(f"  different: {difference['question']!r} about {difference['frame_id']}: "
              f"recorded {difference['recorded']!r}, now {difference['replayed']!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({**result.to_dict(), "skipped": reader.skipped},
                                              indent=2, default=str))
    lost = sum(result.refused.values()) + result.sensor_dropped + sum(reader.skipped.values())
    return 1 if lost else 0


def cmd_report(args: argparse.Namespace) -> int:
    from recording.report import load_truth, write_report
    from recording.ros2 import TopicMap

    source = Path(args.recording)
    out = Path(args.out) if args.out else source.parent / f"{source.stem}-report"
    truth = load_truth(args.truth) if args.truth else None
    topic_map = TopicMap.load(args.map) if args.map else None
    md, png, drive = write_report(source, out, truth, topic_map)
    for line in drive.notices:
        _note(line)
    print(f"report: {md}" + (f", {png}" if png else " (no status samples: no timeline PNG)"))
    return 0
