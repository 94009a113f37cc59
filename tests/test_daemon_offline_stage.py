"""Which offline stage a run uses (full in the model store, or the quick one of
``mpnp demo --quick`` in its sub-store) and that the quick one is really smaller; no model
runs here (the builders are replaced by fakes that record what they were asked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import adapt.prepare as prepare
from adapt.prepare import DAY_STATE, RECORD_FILE, PrepareConfig, world_dir_for
from daemon.offline_stage import (
    QUICK_SUBSTORE,
    choose_offline_stage,
    is_prepared,
    load_prepared,
    quick_store_dir,
)


def _mark_prepared(store: Path) -> None:
    record = store / "states" / DAY_STATE / RECORD_FILE
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"day_accuracy": 0.5}))


def test_choice_full_store_prepared_wins_even_with_quick(tmp_path):
    _mark_prepared(tmp_path)
    _mark_prepared(tmp_path / QUICK_SUBSTORE)  # an older quick stage is ignored then
    for quick in (False, True):
        choice = choose_offline_stage(str(tmp_path), quick)
        assert (choice.stage, choice.store, choice.prepared) == ("full", tmp_path, True)


def test_choice_quick_without_full_stage_uses_the_sub_store(tmp_path):
    choice = choose_offline_stage(str(tmp_path), quick=True)
    assert choice.stage == "quick" and not choice.prepared
    assert choice.store == tmp_path / "demo-quick" == quick_store_dir(tmp_path)
    assert not is_prepared(tmp_path)  # choosing builds nothing
    _mark_prepared(choice.store)
    again = choose_offline_stage(str(tmp_path), quick=True)
    assert (again.stage, again.store, again.prepared) == ("quick", choice.store, True)
    assert again.to_dict() == {"stage": "quick", "store": str(choice.store),
                               "was_prepared": True}


def test_choice_not_quick_keeps_the_main_store(tmp_path, monkeypatch):
    _mark_prepared(tmp_path / QUICK_SUBSTORE)  # a quick stage never stands in for the full
    choice = choose_offline_stage(str(tmp_path), quick=False)
    assert (choice.stage, choice.store, choice.prepared) == ("full", tmp_path, False)
    monkeypatch.setenv("MPNP_HOME", str(tmp_path / "home"))
    assert choose_offline_stage(None, quick=True).store == tmp_path / "home" / "demo-quick"


@pytest.fixture
def builders(monkeypatch):
    calls: list[tuple] = []

    def fake_ensure(store_dir=None, config=None, *, llm=None, tokenizer=None, **kw):
        calls.append(("ensure", Path(store_dir), config, llm))
        return "built"

    def fake_open(store_dir=None):
        calls.append(("open", Path(store_dir), None, None))
        return "opened"

    monkeypatch.setattr(prepare, "ensure_prepared", fake_ensure)
    monkeypatch.setattr(prepare, "open_prepared", fake_open)
    return calls


def test_load_prepared_quick_goes_through_ensure_prepared_with_the_quick_config(
        tmp_path, builders):
    sub = quick_store_dir(tmp_path)
    assert load_prepared(sub, "llm", "tok", stage="quick") == "built"
    _mark_prepared(sub)  # reuse is ensure_prepared's call too (it checks the config digest)
    assert load_prepared(sub, "llm", "tok", stage="quick") == "built"
    for kind, store, config, llm in builders:
        assert (kind, store, llm) == ("ensure", sub, "llm")
        assert config.digest() == PrepareConfig.quick().digest()


def test_load_prepared_full_builds_the_default_or_opens_what_is_there(tmp_path, builders):
    assert load_prepared(str(tmp_path), "llm", "tok") == "built"
    kind, store, config, _ = builders[-1]
    assert (kind, store) == ("ensure", tmp_path)
    assert config.digest() == PrepareConfig().digest()
    _mark_prepared(tmp_path)
    assert load_prepared(str(tmp_path)) == "opened"
    assert builders[-1][:2] == ("open", tmp_path)
    with pytest.raises(ValueError, match="offline stage must be one of"):
        load_prepared(str(tmp_path), stage="tiny")


def test_quick_config_is_smaller_where_it_says_and_digests_differently():
    quick, full = PrepareConfig.quick(), PrepareConfig()
    qw, fw = quick.world, full.world
    assert qw.day_frames + qw.night_frames <= (fw.day_frames + fw.night_frames) // 5
    assert qw.night_frames > 0 and qw.day_frames > 0
    # the demo's live frames come from the same geometry, so they fit the quick encoders
    for name in ("image_height", "image_width", "lidar_beams", "lidar_width", "seed",
                 "frames_per_scene", "questions_per_frame", "day_light", "night_light"):
        assert getattr(qw, name) == getattr(fw, name), name
    kinds = {*full.encoders.values(), *full.extra_encoders.values()}
    assert set(quick.pretrain) == kinds and full.pretrain == {}
    for config in quick.pretrain.values():
        assert config.epochs == 1 and config.corpus is None and config.encoder == {}
    assert quick.day_samples < full.day_samples
    assert quick.val_samples < full.val_samples and quick.test_samples < full.test_samples
    assert quick.train.epochs < full.train.epochs
    assert quick.encoders == full.encoders and quick.num_blocks == full.num_blocks
    assert quick.digest() != full.digest()
    assert world_dir_for(qw, Path("s")) != world_dir_for(fw, Path("s"))
    text = quick.describe()
    assert "720 frames" in text and "1-epoch encoders" in text and "240 day questions" in text
    assert "camera-vit 2, lidar-rangevit 3, radar-pointnet 4 epochs" in full.describe()


def test_backend_loads_the_llm_from_the_main_store_and_the_stage_from_its_own(
        tmp_path, monkeypatch):
    import daemon.mpnp_backend as backend
    import mpnp.llm

    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_llm(name, store=None, **kw):
        seen["llm_store"] = store
        return "llm", "tok"

    def fake_prepared(store, llm, tokenizer, stage="full"):
        seen.update(offline_store=store, stage=stage, llm=llm)
        raise Stop

    monkeypatch.setattr(mpnp.llm, "load_llm", fake_llm)
    monkeypatch.setattr(backend, "load_prepared", fake_prepared)
    sub = str(quick_store_dir(tmp_path))
    with pytest.raises(Stop):
        backend.create_mpnp_backend(model_store=str(tmp_path), offline_store=sub,
                                    offline_stage="quick")
    assert seen == {"llm_store": str(tmp_path), "offline_store": sub, "stage": "quick",
                    "llm": "llm"}
    with pytest.raises(Stop):
        backend.create_mpnp_backend(model_store=str(tmp_path))
    assert seen["offline_store"] == str(tmp_path) and seen["stage"] == "full"
    with pytest.raises(ValueError, match="offline_stage"):
        backend.MPnPBackendConfig(offline_stage="tiny")


@pytest.mark.parametrize("full_prepared, quick, stage, store, says", [
    (False, True, "quick", "demo-quick", "building the quick one first"),
    (True, True, "full", "", "using the full offline stage prepared in"),
    (False, False, "full", "", "about 30-45 minutes"),
])
def test_demo_passes_its_choice_to_the_backend_and_says_so(
        tmp_path, monkeypatch, full_prepared, quick, stage, store, says):
    import daemon.mpnp_backend as backend
    from daemon.demo import DemoConfig, run_demo

    if full_prepared:
        _mark_prepared(tmp_path)
    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_backend(**options):
        seen.update(options)
        raise Stop

    monkeypatch.setattr(backend, "create_mpnp_backend", fake_backend)
    lines: list[str] = []
    with pytest.raises(Stop):
        run_demo(DemoConfig(out_dir=str(tmp_path / "out"), model_store=str(tmp_path),
                            quick=quick), progress=lines.append)
    assert seen["model_store"] == str(tmp_path) and seen["offline_stage"] == stage
    assert seen["offline_store"] == str(tmp_path / store if store else tmp_path)
    text = "\n".join(lines)
    assert says in text and seen["offline_store"] in text
    if stage == "quick":
        assert "720 frames" in text and "1-epoch encoders" in text and "minutes" in text
