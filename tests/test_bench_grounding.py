"""``mpnp bench grounding``: question-type filters, subsets and the table (the run itself is
CI's ``--quick`` benchmark)."""

from __future__ import annotations

import pytest

from bench.grounding import TYPE_SETS, _subset, parse_types, to_markdown
from scenes.dataset import QADataset
from scenes.sample import QAItem


def test_type_filters_by_name_and_by_list():
    assert parse_types("H0") == TYPE_SETS["H0"] and len(TYPE_SETS["all"]) == 10
    assert all(k.endswith("/1") for k in parse_types("H1"))
    assert parse_types("status/0, exist/0") == ("status/0", "exist/0")
    for bad in ("status", "status/2,exist/0", "colour/0", ""):
        with pytest.raises(ValueError, match="unknown question types"):
            parse_types(bad)


def _dataset() -> QADataset:
    from scenes.dataset import FrameInfo

    items = [QAItem(f"f{i % 4}", f"q{i}", "yes", ("exist", "count")[i % 2], i // 4 % 2)
             for i in range(16)]
    frames = {f"f{i}": FrameInfo(scene_id=f"s{i}", light=1.0) for i in range(4)}
    return QADataset(items, frames, loader=lambda fid: None, name="t")


def test_subset_keeps_the_types_and_only_the_frames_they_ask_about():
    data = _dataset()
    part = _subset(data, ("exist/0",), None, seed=0)
    assert part.items and {(q.template_type, q.num_hop) for q in part} == {("exist", 0)}
    assert set(part._frames) == {q.frame_id for q in part.items}
    two = _subset(data, ("exist/0", "count/1"), 2, seed=0)
    assert len(two) == 2 and two.items == sorted(two.items, key=lambda q: q.frame_id)
    assert _subset(data, ("exist/0", "count/1"), 2, seed=0).items == two.items  # determinism


def test_markdown_shows_reads_beside_accuracy_and_intervals():
    meta = {"llm": {"model_type": "llama", "num_layers": 4, "name": "tiny"}, "light": "day",
            "sizes": {"train": 8, "val": 4},
            "config": {"types": ["exist/0", "count/0"], "num_blocks": 4, "epochs": 2,
                       "batch_size": 16, "gate": "logit", "init_alpha": 0.05}}
    rows = [{"encoder": "oracle", "accuracy": 0.75, "ci95": [0.3, 0.95], "count": 4,
             "swapped_accuracy": 0.5, "swapped_ci95": [0.15, 0.85], "reads": 0.25,
             "per_type_hop": {"exist/0": 1.0, "count/0": 0.5}, "alphas": [0.1, 0.2]},
            {"encoder": "question-only", "accuracy": 0.5, "ci95": [0.15, 0.85], "count": 4,
             "per_type_hop": {"exist/0": 0.5}}]
    md = to_markdown({"meta": meta, "rows": rows})
    assert "| oracle | 75.0 [30.0, 95.0] | 50.0 [15.0, 85.0] | +25.0 | 100.0 | 50.0 |" in md
    assert "| question-only | 50.0 [15.0, 85.0] | — | — | 50.0 | — |" in md
    assert "- oracle: [0.1, 0.2]" in md


def test_bad_options_are_named_in_one_line(capsys):
    from mpnp.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "grounding", "--types", "colour/0"])
    assert "unknown question types" in capsys.readouterr().err
    from bench.grounding import _main

    args = build_parser().parse_args(["bench", "grounding", "--train-questions", "-5"])
    with pytest.raises(ValueError, match="--train-questions must be >= 1"):
        _main(args)
    args = build_parser().parse_args(["bench", "grounding", "--init-alpha", "1.5"])
    with pytest.raises(ValueError, match="init_alpha must be in"):
        _main(args)


def test_scene_isolation_finds_the_scene_words_of_each_prompt():
    from bench.grounding import SceneIsolation
    from mpnp.generation import encode_prompts
    from mpnp.tiny import tiny_llm

    _, tok = tiny_llm("llama", num_layers=2)
    questions = ["objects: parked car front, bus back. Are there any buses?",
                 "objects: barrier front left. What is it?"]
    batch = encode_prompts(tok, questions)
    mask = SceneIsolation(tok, first_block=1).scene_mask(batch.input_ids)
    for row, question in zip(range(2), questions):
        scene = tok.decode(batch.input_ids[row][mask[row]].tolist())
        assert scene == question[:question.index(".") + 1]
    with pytest.raises(ValueError, match="no scene words"):
        SceneIsolation(tok, 1).scene_mask(encode_prompts(tok, ["Are there any buses?"]).input_ids)


def test_scene_isolation_closes_the_scene_below_the_connected_blocks_only():
    from aligners.model import MPnPModel
    from bench.grounding import SceneIsolation
    from mpnp.generation import encode_prompts
    from mpnp.tiny import tiny_llm

    llm, tok = tiny_llm("llama", num_layers=4)
    model = MPnPModel(llm, tok)
    iso = SceneIsolation(tok, first_block=2)
    batch = encode_prompts(tok, ["objects: bus front. Is there a bus?"])
    seen = {}
    with iso.active(model):
        model(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids)
        seen = {j: iso._provide(j) for j in range(4)}
    assert seen[0] is not None and seen[1] is not None and seen[0].any()
    assert seen[2] is None and seen[3] is None
    assert iso._mask is None  # released with the context


def test_markdown_says_what_the_tokens_are():
    from test_encoders import TINY

    from bench.grounding import _token_summary
    from encoders import create_encoder

    slotted = create_encoder("camera-vit", **{**TINY["camera-vit"], "slots": 2})
    plain = create_encoder("lidar-rangevit", **TINY["lidar-rangevit"])
    assert _token_summary(slotted) == "camera-vit: 12 x 32, 2 object slots per view"
    assert _token_summary(plain) == "lidar-rangevit: 8 x 32"
    meta = {"llm": {"model_type": "llama", "num_layers": 4, "name": "tiny"}, "light": "day",
            "sizes": {"train": 8, "val": 4}, "encoder_tokens": {"camera": "camera-vit: 12 x 32"},
            "config": {"types": ["exist/0"], "num_blocks": 4, "epochs": 2, "batch_size": 16,
                       "gate": "logit", "init_alpha": 0.05}}
    assert "Tokens: camera-vit: 12 x 32." in to_markdown({"meta": meta, "rows": []})


def test_a_learning_curve_is_parsed_and_tabled_with_the_end_of_training():
    from mpnp.cli import build_parser

    args = build_parser().parse_args(["bench", "grounding", "--curve", "300,150",
                                      "--autocast", "bfloat16"])
    assert args.curve == (300, 150) and args.autocast == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "grounding", "--curve", "0"])
    from bench.grounding import GroundingConfig

    assert GroundingConfig(curve=(300, 150, 150)).curve == (150, 300)
    with pytest.raises(ValueError, match="curve"):
        GroundingConfig(curve=(-1,))
    meta = {"llm": {"model_type": "llama", "num_layers": 4, "name": "tiny"}, "light": "day",
            "sizes": {"train": 8, "val": 4},
            "config": {"types": ["exist/0"], "num_blocks": 4, "epochs": 1, "batch_size": 16,
                       "gate": "logit", "init_alpha": 0.05}}
    point = {"accuracy": 0.5, "ci95": [0.2, 0.8], "per_type_hop": {"exist/0": 0.5}}
    rows = [{"encoder": "oracle-text", "accuracy": 0.75, "ci95": [0.3, 0.95], "steps": 20,
             "per_type_hop": {"exist/0": 0.75}, "curve": [{"steps": 10, **point}]}]
    md = to_markdown({"meta": meta, "rows": rows})
    assert "| oracle-text | 10 | 50.0 [20.0, 80.0] | 50.0 |" in md
    assert "| oracle-text | 20 | 75.0 [30.0, 95.0] | 75.0 |" in md
    meta["precision"] = "bfloat16 autocast"
    assert "Training steps in bfloat16 autocast." in to_markdown({"meta": meta, "rows": rows})


def test_rows_get_only_their_own_encoders(tmp_path, monkeypatch):
    """An oracle-only run pretrains nothing; a kind by name is pretrained on its own; an
    unknown row is refused before any encoder is touched."""
    import bench.grounding as g
    from adapt.prepare import PrepareConfig

    made = []
    monkeypatch.setattr(g, "ensure_pretrained",
                        lambda kind, *a, **k: made.append(kind) or g.create_encoder(
                            "oracle").freeze())
    prepare = PrepareConfig()
    rows = g.row_encoders(["oracle", "oracle+summaries", "oracle-text"], prepare, tmp_path,
                          tmp_path)
    assert made == [] and rows["oracle+summaries"].config.summaries
    g.row_encoders(["lidar", "lidar-objects"], prepare, tmp_path, tmp_path)
    assert made == [prepare.encoders["lidar"], "lidar-objects"]
    with pytest.raises(ValueError, match="no encoder for \\['sonar'\\]"):
        g.row_encoders(["oracle", "lidar-objects", "sonar"], prepare, tmp_path, tmp_path)
    assert made == [prepare.encoders["lidar"], "lidar-objects"]


def test_a_runtime_samples_curve_is_parsed_checked_and_tabled():
    from bench.grounding import GroundingConfig
    from mpnp.cli import build_parser

    args = build_parser().parse_args(["bench", "grounding", "--samples", "300,100",
                                      "--sample-epochs", "4"])
    assert args.samples == (300, 100) and args.sample_epochs == 4
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "grounding", "--samples", "0"])
    assert GroundingConfig(samples=(300, 100)).samples == (100, 300)
    with pytest.raises(ValueError, match="sample_epochs"):
        GroundingConfig(sample_epochs=0)
    meta = {"llm": {"model_type": "llama", "num_layers": 4, "name": "tiny"}, "light": "night",
            "sizes": {"train": 8, "val": 4},
            "config": {"types": ["exist/0"], "num_blocks": 4, "epochs": 1, "batch_size": 16,
                       "gate": "logit", "init_alpha": 0.05, "sample_epochs": 6}}
    rows = [{"encoder": "lidar", "accuracy": 0.75, "ci95": [0.3, 0.95], "steps": 20,
             "train_samples": 8, "reads": 0.25, "swapped_accuracy": 0.5,
             "per_type_hop": {"exist/0": 0.75},
             "samples": [{"samples": 4, "steps": 6, "accuracy": 0.5, "ci95": [0.2, 0.8],
                          "reads": 0.0, "per_type_hop": {"exist/0": 0.5}}]}]
    md = to_markdown({"meta": meta, "rows": rows})
    assert "6 epochs" in md
    assert "| lidar | 4 | 6 | 50.0 [20.0, 80.0] | +0.0 | 50.0 |" in md
    assert "| lidar | all (8) | 20 | 75.0 [30.0, 95.0] | +25.0 | 75.0 |" in md
