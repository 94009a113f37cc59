"""``mpnp bench table1`` options become the protocol it runs (the run itself is CI's
``--quick`` benchmark)."""

from __future__ import annotations

import pytest

from bench.table1 import BASELINES, config_from_args
from mpnp.cli import build_parser


def _config(*options: str):
    return config_from_args(build_parser().parse_args(["bench", "table1", *options]))


def test_defaults_are_the_committed_protocol():
    cfg = _config()
    assert (cfg.day_samples, cfg.night_samples, cfg.test_samples, cfg.epochs) == (320, 320,
                                                                                  800, 1)
    assert cfg.test_samples >= 800 and cfg.oracle  # the floor and the ceiling row
    assert cfg.ns == (4, 8, 12, 15, 20, 25) and cfg.baselines == BASELINES


def test_sizes_and_n_from_the_command_line():
    cfg = _config("--day-samples", "640", "--night-samples", "0", "--test-samples", "200",
                  "--epochs", "2", "--ns", "13", "--methods", "full_llm")
    assert cfg.day_samples == 640 and cfg.night_samples is None  # 0: every night question
    assert cfg.test_samples == 200 and cfg.epochs == 2
    assert cfg.ns == (13,) and cfg.study_n == 13 and cfg.baselines == ("full_llm",)
    assert _config("--quick", "--epochs", "3").model == "tiny"


@pytest.mark.parametrize("options, message", [
    (("--day-samples", "0"), "--day-samples must be >= 1"),
    (("--night-samples", "-1"), "--night-samples must be >= 0"),
    (("--methods", "full_llm,gpt"), "unknown methods"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        _config(*options)


def test_targets_use_the_strongest_question_only_row():
    from bench.table1 import check_targets

    def row(method, scenario, acc, n=None):
        return {"method": method, "N": n, "scenario": scenario, "accuracy": acc,
                "table": "main", "adapt_flops": 0.0, "peak_mem_bytes": 0}

    rows = [row("mpnp", "day_c", 0.55, 4), row("mpnp", "night_c", 0.45, 4),
            row("question_only", "day_c", 0.30), row("question_only_nb", "day_c", 0.44),
            row("mpnp_oracle", "day_c", 0.70, 4)]
    checks = {c["target"]: c for c in check_targets({"rows": rows})}
    oracle = checks["oracle mPnP Day − question-only"]
    assert oracle["value"] == pytest.approx(26.0) and oracle["met"]  # against 0.44, not 0.30
    assert checks["mPnP Day (C) − question-only"]["met"]  # +11
    assert checks["mPnP Night (C) − Day (C)"]["met"]  # -10


def test_modality_benchmark_has_the_radar_sets_and_skips_sets_without_encoders():
    from bench.modalities import SETS, select_sets, to_markdown

    assert {"R", "C+R", "L+R", "C+L+R"} <= set(SETS)
    run, skipped = select_sets(None, {"camera", "lidar"})
    assert list(run) == ["C", "L", "C+L"] and skipped == ["R", "C+R", "L+R", "C+L+R"]
    run, skipped = select_sets(["R", "C+R"], {"camera", "lidar", "radar"})
    assert run == {"R": ("radar",), "C+R": ("camera", "radar")} and skipped == []
    with pytest.raises(ValueError, match="unknown modality sets"):
        select_sets(["S"], {"camera"})
    rows = [{"modalities": m, "light": light, "accuracy": 0.5}
            for m in ("R", "C+R", "majority") for light in ("day", "night")]
    meta = {"N": 4, "llm": {"model_type": "llama", "num_layers": 4, "name": "tiny"},
            "sizes": {"day_train": 8, "day_test": 4, "night_test": 4},
            "sets": {"R": ["radar"], "C+R": ["camera", "radar"]}, "skipped_sets": ["L"]}
    md = to_markdown({"meta": meta, "rows": rows})
    assert "| R | 50.0 | 50.0 |" in md and "| C+R |" in md and "Skipped" in md


def test_composed_rows_are_checked_against_adapted_c_plus_l_and_each_single_modality():
    from bench.table1 import check_targets, composition_section

    def row(method, scenario, acc, n=4, **extra):
        return {"method": method, "N": n, "scenario": scenario, "accuracy": acc,
                "ci95": [acc - 0.05, acc + 0.05], "table": "main", "adapt_flops": 0.0,
                "peak_mem_bytes": 0, **extra}

    composed = {"compose_s": 0.01, "search_evaluations": 0, "search_questions": 0,
                "search_flops": 0.0, "lambdas": None}
    rows = [row("mpnp", "night_c", 0.40), row("mpnp", "night_c_to_l", 0.50),
            row("mpnp", "night_c_to_cl", 0.53),
            row("mpnp_naive", "night_c_to_cl", 0.45, **composed),
            row("mpnp_damc", "night_c_to_cl", 0.51,
                **{**composed, "lambdas": [0.5, 1.0], "search_evaluations": 4,
                   "search_questions": 160, "search_flops": 2e12})]
    checks = {c["target"]: c for c in check_targets({"rows": rows})}
    within = checks["DAMC Night (C → C+L) − adapted C+L (N=4)"]
    assert within["value"] == pytest.approx(-2.0) and within["met"]
    above = checks["DAMC Night (C → C+L) − the better single modality (N=4)"]
    assert above["value"] == pytest.approx(1.0) and above["met"]  # vs L's 0.50, not C's 0.40
    text = "\n".join(composition_section(rows))
    assert "| 4 | damc | 51.0" in text and "0.5, 1" in text and "4 / 160 / 2.000" in text
    assert "| 4 | naive | 45.0" in text


def test_the_grounding_section_shows_what_swapping_frames_costs():
    from bench.table1 import grounding_section

    g = {"accuracy": 0.6, "swapped_accuracy": 0.45, "reads": 0.15, "changed": 0.4,
         "count": 800, "ci95": [0.57, 0.63], "swapped_ci95": [0.42, 0.48]}
    rows = [{"method": "mpnp_oracle", "N": 12, "scenario": "day_c", "accuracy": 0.6,
             "ci95": [0.57, 0.63], "table": "main", "grounding": g},
            {"method": "mpnp", "N": 4, "scenario": "day_c", "accuracy": 0.5,
             "ci95": [0.47, 0.53], "table": "main"}]
    text = "\n".join(grounding_section(rows))
    assert "| mpnp_oracle | 60.0 ± 3.0 | 45.0 ± 3.0 | +15.0 | 40 % |" in text
    assert "| mpnp |" not in text  # rows without a grounding measurement are not listed
    assert grounding_section(rows[1:]) == []
