"""``mpnp bench reliability`` at tiny sizes: the same suites as the committed full-size run
(real sockets, the fake backend), so a regression in the suites themselves fails here."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import cli as bench_cli
from bench.reliability import (
    QUERY_CATEGORIES,
    markdown,
    run_ingest_fuzz,
    run_kill,
    run_query_fuzz,
    run_soak,
)


def test_query_fuzz_small(tmp_path):
    result = run_query_fuzz(540, seed=3, tmp=tmp_path)
    assert result["passed"], result["crashes"] or result["unanswered"]
    assert result["answered"] == 540 and not result["crashes"]
    assert set(result["replies_by_category"]) == set(QUERY_CATEGORIES)
    # every category got answers, and the error codes are the documented ones
    codes = {c for r in result["replies_by_category"].values() for c in r}
    assert codes <= {"ok", "bad_framing", "unsupported_version", "unknown_command",
                     "bad_request", "too_large", "no_frame", "frame_not_found", "power_error",
                     "conflict", "busy"}, codes
    assert "internal" not in result["daemon_errors"]


def test_ingest_fuzz_small_counts_every_drop_under_its_reason(tmp_path):
    result = run_ingest_fuzz(1500, seed=5, tmp=tmp_path)
    assert result["passed"], result["mismatched"] or result["crashes"]
    for reason in ("bad_header", "header_too_large", "unsupported_version", "unknown_sensor",
                   "buffer_mismatch", "bad_dtype", "bad_shape", "truncated", "too_large",
                   "non_finite", "unsupported_frame", "stale"):
        assert result["observed"].get(reason, 0) == result["expected"][reason] > 0, reason
    assert "internal" not in result["observed"]
    assert result["valid_after"]["accepted"] == result["valid_after"]["sent"]


def test_kill_suite_with_the_fake_backend(tmp_path):
    result = run_kill(2, "fake", seed=1, tmp=tmp_path)
    assert result["passed"], result
    assert result["kills"] == 2 and result["corrupt_states"] == 0
    assert len(result["committed_generations"]) >= 2


def test_soak_suite_with_the_fake_backend(tmp_path):
    result = run_soak(0.06, "fake", tmp=tmp_path, question_interval_s=0.3)
    assert result["passed"], result
    assert result["accepted_fraction"] >= 0.99 and result["questions"]["count"] >= 5
    assert result["adaptations"]["started"] >= 1
    text = markdown({"query_fuzz": None, "soak": result})
    assert "Soak" in text and "Not run" in text  # kill not in this result


def test_cli_registers_reliability(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    bench_cli.add_commands(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(["bench", "reliability", "--query-fuzz", "90", "--ingest-fuzz",
                              "200", "--json", str(out), "--markdown", str(tmp_path / "r.md")])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["passed"] and data["query_fuzz"]["requests"] == 90
    assert "kill" not in data and "Not run" in (tmp_path / "r.md").read_text()
    bad = parser.parse_args(["bench", "reliability", "--minutes", "0"])
    with pytest.raises(ValueError, match="minutes"):
        bad.func(bad)
