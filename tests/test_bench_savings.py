"""``mpnp bench savings`` measures every saving side by side on the same batch."""

from __future__ import annotations

from unittest import mock

from test_adapt_training import CAM, feature_set

from bench import savings
from mpnp.tiny import tiny_llm


def _measure(bf16: bool) -> dict:
    llm, tok = tiny_llm("llama", num_layers=4)
    with mock.patch.object(savings, "bf16_supported", return_value=bf16):
        return savings.measure_training_savings(llm, tok, feature_set(), CAM, n=2,
                                                batch_size=4, rounds=2)


def test_each_saving_is_measured_against_the_papers_cost():
    rows = _measure(bf16=True)
    base = rows["neither (the paper's cost)"]
    assert base["flops_vs_paper"] == 1.0
    # lower-block replay and answer-only logits each remove counted work
    assert rows["no lower-block replay"]["step_flops"] < base["step_flops"]
    assert rows["no answer-only logits"]["step_flops"] < base["step_flops"]
    assert rows["both savings"]["step_flops"] < min(rows["no lower-block replay"]["step_flops"],
                                                    rows["no answer-only logits"]["step_flops"])
    # autocast changes the arithmetic's precision, not the work counted
    assert rows[savings.BF16_VARIANT]["step_flops"] == rows["both savings"]["step_flops"]
    assert all(r["step_s"] > 0 for r in rows.values())


def test_without_bfloat16_units_autocast_is_not_measured_and_the_table_says_so():
    rows = _measure(bf16=False)
    assert savings.BF16_VARIANT not in rows
    result = {"meta": {"N": 2, "batch": 4, "llm": {"num_layers": 4, "model_type": "llama"}},
              "training_step": rows,
              "encoder_cache": {"frames": 4, "load_and_encode_s": 1.0, "from_cache_s": 0.1,
                                "ratio": 0.1}}
    assert "no bfloat16 matrix units" in savings.to_markdown(result)
