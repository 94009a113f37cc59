"""The demo's report: phases scored from the live queries, energy integrated over the
adapting span, a readable Markdown summary and the timeline PNG (the run itself needs the
embedded SmolLM2 and minutes; `bash tools/dev.sh main` is that check)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from daemon.demo import DemoConfig, _report, plot_timeline, report_markdown
from daemon.offline_stage import OfflineChoice


def _timeline() -> list[dict]:
    rows = []
    for t in range(0, 40, 2):
        night = t >= 10
        adapting = 14 <= t < 30
        rows.append({
            "t": float(t), "light": 0.05 if night else 1.0,
            "policy_light": 0.06 if night else 0.95,
            "serving": ["lidar"] if t >= 30 else ["camera"],
            "desired": ["lidar"] if night else ["camera"],
            "adapting": adapting, "progress": (t - 14) / 16 if adapting else None,
            "phase": "train" if adapting else None,
            "mode": "MODE_15W" if t >= 20 else "MODE_30W",
            "watts": 15.0 if t >= 20 else 30.0,
        })
    return rows


def _record(t: float, light: float, modalities: list[str], correct: bool) -> dict:
    return {"t": t, "light": light, "question": "q", "expected": "yes",
            "answer": "yes" if correct else "no", "correct": correct,
            "modalities": modalities, "generation": 1, "latency_s": 0.25 + t / 1000,
            "daemon_latency_s": 0.2}


def test_report_scores_phases_and_integrates_energy(tmp_path):
    records = ([_record(t, 1.0, ["camera"], t % 4 == 0) for t in range(0, 10, 2)]
               + [_record(t, 0.05, ["camera"], False) for t in range(10, 30, 2)]
               + [_record(t, 0.05, ["lidar"], True) for t in range(30, 40, 2)])
    status = {"counters": {"queries": len(records)},
              "budget": {"decisions": [{"mode": "MODE_30W", "n_blocks": 13, "steps": 80,
                                        "feasible": True, "replan": False,
                                        "reason": "largest N", "est_energy_j": 8592.7}]}}
    backend = SimpleNamespace(
        last_report={"modalities": ["lidar"], "n_blocks": 13, "steps": 73, "samples": 292,
                     "flops": 1.73e12, "wall_s": 137.7},
        prepared=SimpleNamespace(record={"day_accuracy": 0.40875, "night_accuracy": 0.355,
                                         "num_blocks": 12}))
    result = {"outcome": "better", "adapted_accuracy": 0.41666666, "serving_accuracy": 0.354166}
    backend.prepared.data_dir = tmp_path / "demo-quick" / "worlds" / "w-1"
    backend.prepared.record["config_digest"] = "abc"
    offline = OfflineChoice("quick", tmp_path / "demo-quick", prepared=False)
    report = _report(DemoConfig(out_dir=str(tmp_path)), _timeline(), records, status,
                     backend, result, None, 1.0, 200.0, offline)
    assert report["offline_stage"] == {
        "stage": "quick", "store": str(tmp_path / "demo-quick"), "was_prepared": False,
        "data_dir": str(backend.prepared.data_dir), "config_digest": "abc"}

    phases = report["phases"]
    assert phases["day (camera)"]["queries"] == 5
    assert phases["day (camera)"]["accuracy"] == pytest.approx(3 / 5)
    assert phases["night, camera state (before/while adapting)"]["accuracy"] == 0.0
    assert phases["night, lidar state (after adapting)"]["accuracy"] == 1.0
    # adapting 14..30 s: 14..20 at 30 W, 20..30 at 15 W (left Riemann sum over 2 s rows)
    assert report["adaptation"]["energy_estimate_j"] == pytest.approx(6 * 30 + 10 * 15)
    assert report["power_modes"] == ["MODE_15W", "MODE_30W"]

    text = report_markdown(report)
    assert "serving (camera) 0.354 vs adapted 0.417 -> **better**" in text
    assert "day 0.409, night 0.355" in text and "planner estimate 8593 J" in text
    assert "N = 13 connected blocks" in text and "73 (292 samples)" in text
    assert "0.35416" not in text  # no raw float reprs in the human report
    assert f"Offline stage: **quick**, from `{tmp_path / 'demo-quick'}`, built by this run" in text

    png = tmp_path / "timeline.png"
    plot_timeline(_timeline(), records, png, "demo")
    assert png.stat().st_size > 10_000


def test_demo_config_checks_and_quick_shrinks():
    quick = DemoConfig(quick=True)
    full = DemoConfig()
    assert quick.target_steps < full.target_steps and quick.max_s <= 360
    assert full.max_s <= 600  # the 10-minute bound for the whole demo
    with pytest.raises(ValueError, match="day_s"):
        DemoConfig(day_s=0)
