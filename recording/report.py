"""Field-test report of a recording: the drive's timeline PNG and a Markdown summary.

The timeline is the demo's (:func:`daemon.demo.plot_timeline`), drawn from what the
recording holds: ``/mpnp/status`` samples (policy light, serving and wanted modality sets,
adaptation, power mode and watts), the cameras' ``ambient_light`` (the vehicle's light, when
the sensor sends it), and the recorded questions (latency; accuracy where the ground truth
is known: a JSONL file of ``{"question", "answer"[, "frame_id"]}`` lines).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recording.reader import RecordingReader

log = logging.getLogger(__name__)


def load_truth(path: str | Path) -> dict[tuple[str | None, str], str]:
    """Ground truth: ``(frame_id or None, question) -> answer`` from JSONL lines."""
    truth: dict[tuple[str | None, str], str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            truth[(entry.get("frame_id"), str(entry["question"]))] = str(entry["answer"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}:{number}: a ground-truth line must be a JSON object "
                             "with question and answer (and optionally frame_id)") from None
    return truth


@dataclass
class Drive:
    """What a recording says about the drive, ready to draw and summarize."""

    source: str
    kind: str
    duration_s: float = 0.0
    timeline: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    sensors: Counter = field(default_factory=Counter)
    sensor_bytes: Counter = field(default_factory=Counter)
    events: list[dict[str, Any]] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    controls: list[dict[str, Any]] = field(default_factory=list)
    recorder: dict[str, Any] | None = None
    notices: list[str] = field(default_factory=list)
    last_status: dict[str, Any] | None = None


def read_drive(path: str | Path, truth: dict[tuple[str | None, str], str] | None = None,
               topic_map: Any = None) -> Drive:
    """Read a recording (any kind :class:`RecordingReader` reads) into a :class:`Drive`."""
    from mpnp.answers import exact_match

    notices: list[str] = []
    reader = RecordingReader(Path(path), topic_map, notice=notices.append)
    drive = Drive(str(path), reader.kind, notices=notices)
    t0: int | None = None
    light: float | None = None
    last = 0
    for item in reader:
        t0 = item.log_time_ns if t0 is None else t0
        last = item.log_time_ns
        t = (item.log_time_ns - t0) / 1e9
        if item.kind == "sensor":
            assert item.parts is not None
            try:
                header = json.loads(bytes(item.parts[0]))
            except ValueError:
                continue
            sensor = str(header.get("sensor"))
            drive.sensors[sensor] += 1
            drive.sensor_bytes[sensor] += sum(len(memoryview(p)) for p in item.parts[1:])
            if isinstance(header.get("ambient_light"), (int, float)):
                light = float(header["ambient_light"])
        elif item.kind == "status":
            drive.timeline.append(_timeline_row(t, light, item.body or {}))
            drive.last_status = item.body
        elif item.kind == "event":
            drive.events.append({"t": t, **(item.body or {})})
        elif item.kind == "recorder":
            drive.recorder = item.body
        elif item.kind == "request":
            body = item.body or {}
            if body.get("status") != "ok":
                drive.errors[str((body.get("reply") or {}).get("code", "?"))] += 1
            elif body.get("type") == "query":
                drive.records.append(_record(t, body, truth, exact_match))
            else:
                drive.controls.append({"t": t, "type": body.get("type"),
                                       "request": body.get("request"),
                                       "reply": body.get("reply")})
    drive.duration_s = 0.0 if t0 is None else (last - t0) / 1e9
    return drive


def _timeline_row(t: float, light: float | None, status: dict[str, Any]) -> dict[str, Any]:
    run = status.get("adaptation")
    power = status.get("power") or {}
    policy = status.get("policy") or {}
    policy_light = policy.get("light")
    return {
        "t": t, "light": light,
        "policy_light": policy_light if isinstance(policy_light, (int, float)) else None,
        "serving": (status.get("serving") or {}).get("modalities") or [],
        "desired": status.get("desired") or [],
        "adapting": run is not None, "progress": (run or {}).get("progress"),
        "phase": (run or {}).get("phase"),
        "mode": (power.get("mode") or {}).get("name"),
        "watts": (power.get("reading") or {}).get("watts"),
    }


def _record(t: float, body: dict[str, Any], truth: dict | None, exact_match: Any
            ) -> dict[str, Any]:
    request, reply = body.get("request") or {}, body.get("reply") or {}
    question, frame_id = str(request.get("question")), reply.get("frame_id")
    expected = None
    if truth:
        expected = truth.get((frame_id, question), truth.get((None, question)))
    answer = str(reply.get("answer"))
    return {"t": t, "question": question, "frame_id": frame_id, "answer": answer,
            "expected": expected,
            "correct": None if expected is None else bool(exact_match(answer, expected)),
            "modalities": reply.get("modalities") or [],
            "latency_s": reply.get("latency_s", body.get("latency_s"))}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f} ms"


def report_markdown(drive: Drive, png: str | None) -> str:
    """The Markdown summary of a drive."""
    lines = [f"# Field-test report: {Path(drive.source).name}", "",
             f"Source `{drive.source}` ({drive.kind}), {drive.duration_s:.1f} s recorded, "
             f"{len(drive.timeline)} status samples, {sum(drive.sensors.values())} sensor "
             f"messages, {len(drive.records)} answered questions, {len(drive.events)} "
             "events.", ""]
    if png:
        lines += [f"![timeline]({png})", ""]
    lines += ["## Sensors", "", "| sensor | messages | rate (Hz) | MB |", "|---|---|---|---|"]
    for sensor, count in sorted(drive.sensors.items()):
        rate = count / drive.duration_s if drive.duration_s > 0 else 0.0
        lines.append(f"| {sensor} | {count} | {rate:.1f} | "
                     f"{drive.sensor_bytes[sensor] / 1e6:.1f} |")
    if not drive.sensors:
        lines.append("| (none recorded: `mpnp record` sees events and status only) | | | |")
    lines += ["", "## Timeline", ""]
    interesting = ("context.changed", "modality.switched", "adaptation.started",
                   "adaptation.result", "compose.started", "compose.finished", "power.mode",
                   "budget.plan", "daemon.lifecycle")
    shown = [(e["t"], f"`{e.get('event')}`: {_describe(e)}") for e in drive.events
             if e.get("event") in interesting]
    for control in drive.controls:
        request = {k: v for k, v in (control["request"] or {}).items() if k != "id"}
        shown.append((control["t"], f"operator `{control['type']}` "
                                    f"{json.dumps(request, default=str)[:120]}"))
    for t, text in sorted(shown, key=lambda entry: entry[0]):
        lines.append(f"- t = {t:7.1f} s {text}")
    if not shown:
        lines.append("No events recorded.")
    lines += ["", "## Questions", ""]
    latencies = [r["latency_s"] for r in drive.records if r["latency_s"] is not None]
    if drive.records:
        lines.append(f"{len(drive.records)} answered; daemon latency p50 "
                     f"{_ms(_quantile(latencies, 0.5))}, p95 {_ms(_quantile(latencies, 0.95))}, "
                     f"p99 {_ms(_quantile(latencies, 0.99))}, mean "
                     f"{_ms(statistics.fmean(latencies) if latencies else None)}.")
        scored = [r for r in drive.records if r["correct"] is not None]
        if scored:
            lines += ["", "| serving set | questions with ground truth | accuracy |",
                      "|---|---|---|"]
            by_set: dict[str, list[bool]] = {}
            for r in scored:
                by_set.setdefault("+".join(r["modalities"]) or "-", []).append(r["correct"])
            for name, values in sorted(by_set.items()):
                lines.append(f"| {name} | {len(values)} | {sum(values) / len(values):.3f} |")
            lines.append(f"| all | {len(scored)} | "
                         f"{sum(r['correct'] for r in scored) / len(scored):.3f} |")
        else:
            lines.append("No ground truth given (`--truth FILE.jsonl`): accuracy unknown.")
    else:
        lines.append("No questions recorded.")
    if drive.errors:
        lines.append("")
        lines.append("Error replies: " + ", ".join(f"{k} {v}" for k, v in
                                                   sorted(drive.errors.items())) + ".")
    status = drive.last_status or {}
    counters = status.get("counters")
    if counters:
        lines += ["", "## Daemon counters (last status)", "",
                  f"frames in {json.dumps(counters.get('frames_in'))}, dropped "
                  f"{json.dumps(counters.get('frames_dropped'))}, errors "
                  f"{json.dumps(counters.get('errors'))}"]
    if drive.recorder is not None:
        dropped = drive.recorder.get("dropped") or {}
        lines += ["", "## Recorder", "",
                  f"{drive.recorder.get('written')} messages written, dropped "
                  f"{json.dumps(dropped) if dropped else 'none'}, files "
                  f"{', '.join(drive.recorder.get('files') or [])}."]
    if drive.notices:
        lines += ["", "## Reading problems", ""] + [f"- {n}" for n in drive.notices]
    return "\n".join(lines) + "\n"


def _describe(event: dict[str, Any]) -> str:
    kind = event.get("event")
    if kind == "context.changed":
        return f"policy wants {event.get('desired')} (serving {event.get('serving')})"
    if kind == "modality.switched":
        return (f"serving {event.get('modalities')} (was {event.get('previous')}, from "
                f"{event.get('source')}, generation {event.get('generation')})")
    if kind in ("adaptation.result", "compose.finished"):
        return (f"{event.get('outcome')}, committed {event.get('committed')}, adapted "
                f"{event.get('adapted_accuracy')} vs serving {event.get('serving_accuracy')}")
    if kind == "adaptation.started":
        return (f"{event.get('modalities')}, N = {event.get('n_blocks')}, "
                f"{event.get('steps_planned')} steps")
    if kind == "power.mode":
        return f"{event.get('previous')} -> {event.get('mode')}"
    if kind == "budget.plan":
        plan = event.get("plan") or {}
        return (f"{plan.get('mode')}: N = {plan.get('n_blocks')}, {plan.get('steps')} steps, "
                f"{plan.get('reason')}")
    if kind == "compose.started":
        return f"{event.get('modalities')} by {event.get('method')}"
    return str(event.get("state", ""))


def write_report(path: str | Path, out_dir: str | Path,
                 truth: dict[tuple[str | None, str], str] | None = None,
                 topic_map: Any = None) -> tuple[Path, Path | None, Drive]:
    """``mpnp report``: ``report.md`` and ``timeline.png`` (when the recording has status
    samples) in ``out_dir``."""
    from daemon.demo import plot_timeline

    drive = read_drive(path, truth, topic_map)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png: Path | None = None
    if drive.timeline:
        png = out / "timeline.png"
        plot_timeline(drive.timeline, drive.records, png,
                      f"{Path(path).name}: {drive.duration_s:.0f} s, "
                      f"{len(drive.records)} questions")
    md = out / "report.md"
    md.write_text(report_markdown(drive, png.name if png else None))
    return md, png, drive
