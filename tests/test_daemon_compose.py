"""The daemon's compose path under the fake (toy) backend: a wanted modality set with no stored
state of its own but one stored state per modality is composed (training-free), validated with
the adaptation's gate, served and stored with its provenance, and fine-tuned from when so
configured; without the inputs, or when the gate refuses, the daemon adapts as before. The
operator's ``compose`` command and its errors. (The real backend: test_daemon_mpnp_backend.)"""

from __future__ import annotations

import argparse
import time

import pytest
from test_daemon_support import ToyBackend, running_daemon, test_config, toy_frame, wait_for

from daemon.cli import add_commands
from daemon.client import Client, DaemonError, EventSubscriber, SensorPublisher
from daemon.config import DaemonConfig
from daemon.store import ModelStore

BOTH = ["camera", "lidar"]


def _config(tmp_path, compose: str = "serve", wants=BOTH, **adaptation) -> DaemonConfig:
    return test_config(tmp_path, policy={"name": "fixed", "options": {"modalities": wants}},
                       adaptation={"compose": compose, **adaptation})


def _seed_store(config: DaemonConfig, states=((1, ["lidar"]), (2, ["camera"])),
                llm: str = "toy") -> None:
    """Stored single-modality states (toy versions): the newest (camera) is resumed."""
    store = ModelStore(config.store.directory)
    for version, modalities in states:
        backend = ToyBackend(llm=llm)
        backend.version = version
        store.save_state(backend.save_state, {"modalities": modalities})
    store.close()


def _events(sub: EventSubscriber, until: str, timeout: float = 10.0) -> list[tuple[str, dict]]:
    seen: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = sub.receive(0.1)
        if event is not None:
            seen.append((event[0].value, event[1]))
            if event[0].value == until:
                return seen
    raise AssertionError(f"no {until} event; saw {[k for k, _ in seen]}")


def _ask(daemon, client: Client, frame_id: str = "f0") -> dict:
    with SensorPublisher(daemon.endpoints["ingest"]) as publisher:
        frame = toy_frame(frame_id)
        wait_for(lambda: publisher.send_camera(frame) and publisher.send_lidar(frame)
                 and daemon.metrics.frames_in.total() >= 2)
    return client.ask("q", frame_id)


def test_policy_composes_stored_camera_and_lidar_states_and_serves_the_result(tmp_path):
    config = _config(tmp_path, "serve", auto=True)
    _seed_store(config)
    backend = ToyBackend(composed_accuracy=0.7, serving_accuracy=0.5)
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        status = wait_for(lambda: (s := client.status())["serving"]["modalities"] == BOTH and s)
        composition = status["serving"]["composition"]
        assert status["serving"]["source"] == "composition"
        assert status["serving"]["generation"] == 3
        assert [i["name"] for i in composition["inputs"]] == ["state-00000002", "state-00000001"]
        assert [i["modalities"] for i in composition["inputs"]] == [["camera"], ["lidar"]]
        assert composition["method"] == "damc" and composition["requested_method"] == "auto"
        assert composition["lambdas"] == [0.5, 0.5] and composition["training_flops"] == 0
        assert composition["compose_wall_s"] >= 0 and composition["composed_accuracy"] == 0.7
        last = status["last_composition"]
        assert last["outcome"] == "better" and last["committed"]
        assert last["adapted_accuracy"] == 0.7 and last["serving_accuracy"] == 0.5
        assert status["last_adaptation"] is None  # no training at all
        # composed from camera (v2) and LiDAR (v1); no adaptation was started
        assert ("compose", ("camera", "lidar"), "damc", (2, 1)) in backend.calls
        assert not any(c[0] == "start" for c in backend.calls)
        reply = _ask(daemon, client)
        assert reply["answer"] == "q|camera+lidar|v3|f0" and reply["state_generation"] == 3
        entry = next(e for e in client.list_store()["entries"] if e["generation"] == 3)
        assert entry["meta"]["modalities"] == BOTH
        assert entry["meta"]["composition"]["inputs"] == composition["inputs"]
        assert daemon.metrics.compositions.value(outcome="better") == 1
    # a restart resumes the composed state (a Reconnect, no second composition)
    backend = ToyBackend()
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        status = client.status()
        assert status["serving"]["modalities"] == BOTH and status["serving"]["generation"] == 3
        assert status["serving"]["source"] == "composition"
        time.sleep(0.2)
        assert not any(c[0] in ("compose", "start") for c in backend.calls)


def test_compose_events_and_the_switch_they_announce(tmp_path):
    # The policy wants the camera; the operator forces both once the subscriber is in.
    config = _config(tmp_path, "serve", wants=["camera"])
    _seed_store(config)
    backend = ToyBackend()
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client, \
            EventSubscriber(daemon.endpoints["events"]) as events:
        time.sleep(0.2)  # let the subscription reach the daemon
        client.set_modality("forced", BOTH)
        seen = _events(events, "modality.switched")
        kinds = [k for k, _ in seen]
        assert kinds.index("compose.started") < kinds.index("compose.finished") \
            < kinds.index("modality.switched")
        started = dict(seen)["compose.started"]
        assert started["modalities"] == BOTH and started["method"] == "auto"
        assert [i["generation"] for i in started["inputs"]] == [2, 1]
        finished = dict(seen)["compose.finished"]
        assert finished["outcome"] == "better" and finished["committed"]
        assert finished["composition"]["method"] == "damc"
        assert finished["time_to_decision_s"] >= 0
        switched = dict(seen)["modality.switched"]
        assert switched == {**switched, "modalities": BOTH, "previous": ["camera"],
                            "source": "composition", "generation": 3}
        assert "adaptation.started" not in kinds


def test_without_a_stored_state_per_modality_the_daemon_adapts(tmp_path):
    config = _config(tmp_path, "finetune")  # only the initial camera state gets stored
    backend = ToyBackend()
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        status = wait_for(lambda: (s := client.status())["serving"]["modalities"] == BOTH and s)
        assert status["serving"]["source"] == "adaptation"
        assert status["last_adaptation"]["outcome"] == "better"
        assert status["last_composition"] is None
        assert not any(c[0] == "compose" for c in backend.calls)
        assert ("start", ("camera", "lidar"), 8, 20) in backend.calls
        assert daemon.metrics.compositions.total() == 0


def test_compose_off_adapts_even_when_the_inputs_are_stored(tmp_path):
    config = _config(tmp_path, "off")
    _seed_store(config)
    backend = ToyBackend()
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        wait_for(lambda: client.status()["serving"]["modalities"] == BOTH)
        assert not any(c[0] == "compose" for c in backend.calls)
        assert any(c[0] == "start" for c in backend.calls)


def test_the_gate_refuses_a_worse_composed_state_and_the_daemon_adapts(tmp_path):
    config = _config(tmp_path, "serve")
    _seed_store(config)
    backend = ToyBackend(composed_accuracy=0.4, serving_accuracy=0.5, adapted_accuracy=0.8)
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        status = wait_for(lambda: (s := client.status())["serving"]["modalities"] == BOTH and s)
        last = status["last_composition"]
        assert last["outcome"] == "not_better" and not last["committed"]
        assert last["adapted_accuracy"] == 0.4 and last["serving_accuracy"] == 0.5
        # the composed candidate was discarded, then a normal adaptation won the gate
        compose_at = next(i for i, c in enumerate(backend.calls) if c[0] == "compose")
        assert backend.calls[compose_at + 1] == ("discard",)
        start = next(c for c in backend.calls if c[0] == "start")
        assert start[1] == ("camera", "lidar")
        assert status["serving"]["source"] == "adaptation"
        assert status["serving"]["composition"] is None
        assert status["last_adaptation"]["outcome"] == "better"
        assert sum(c[0] == "compose" for c in backend.calls) == 1, "composed again"
        assert daemon.metrics.compositions.value(outcome="not_better") == 1


def test_finetune_after_compose_trains_from_the_composed_state(tmp_path):
    config = _config(tmp_path, "finetune")
    _seed_store(config)
    backend = ToyBackend(composed_accuracy=0.7, adapted_accuracy=0.8)
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        status = wait_for(lambda: (s := client.status())["serving"]["source"] == "finetune"
                          and s, timeout=10)
        assert status["serving"]["modalities"] == BOTH
        assert status["serving"]["finetuned_from"] == 3  # the composed state's generation
        assert status["serving"]["generation"] == 4
        assert status["last_composition"]["outcome"] == "better"
        assert status["last_adaptation"]["finetune_of"] == 3
        assert status["last_adaptation"]["outcome"] == "better"
        kinds = [c[0] for c in backend.calls if c[0] in ("compose", "commit", "start")]
        assert kinds == ["compose", "commit", "start", "commit"]
        # the fine-tune started from the composed serving state (toy version 3)
        assert backend.calls[-1] == ("commit",)
        assert _ask(daemon, client)["answer"] == "q|camera+lidar|v4|f0"
        entries = {e["generation"]: e["meta"] for e in client.list_store()["entries"]
                   if e["kind"] == "state"}
        assert entries[3]["source"] == "composition" and entries[4]["source"] == "finetune"


def test_finetune_waits_for_the_budget_but_the_composed_state_serves(tmp_path):
    config = _config(tmp_path, "finetune")
    config.power.options = {"switch_delay_s": 0.0, "initial_mode": "MODE_15W",
                            "flops_scale": 1e-9}  # no adaptation fits
    _seed_store(config)
    backend = ToyBackend()
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        status = wait_for(lambda: (s := client.status())["serving"]["modalities"] == BOTH and s)
        assert status["serving"]["source"] == "composition"
        time.sleep(0.2)
        assert not any(c[0] == "start" for c in backend.calls)
        assert not status["budget"]["last"]["feasible"]


def _cli(capsys, endpoint: str, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["client", "--endpoint", endpoint, *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_compose_command_and_its_errors(tmp_path, capsys):
    config = _config(tmp_path, "off", wants=["camera"], auto=False)
    _seed_store(config, states=((2, ["camera"]),))
    backend = ToyBackend(step_delay_s=0.02)
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        def refused(code: str, **body) -> str:
            with pytest.raises(DaemonError) as info:
                client.compose(**body)
            assert info.value.code == code, info.value
            return info.value.message

        assert "method" in refused("bad_request", modalities=BOTH, method="average")
        assert "two or more" in refused("bad_request", modalities=["lidar"])
        assert "bool" in refused("bad_request", modalities=BOTH, finetune="yes")
        assert "['lidar']" in refused("store_error", modalities=BOTH)
        # a LiDAR state of another LLM: refused by the backend, nothing changes
        _add_state(daemon, 1, ["lidar"], llm="other-llm")
        message = refused("backend_error", modalities=BOTH)
        assert "another LLM" in message and "other-llm" in message
        assert client.status()["last_composition"]["outcome"] == "failed"
        assert client.status()["serving"]["modalities"] == ["camera"]
        # a LiDAR state of this LLM: composed, validated, served
        _add_state(daemon, 5, ["lidar"])
        client.adapt("start", ["lidar"])
        assert "already running" in refused("conflict", modalities=BOTH)
        client.adapt("stop")
        code, out, err = _cli(capsys, daemon.endpoints["query"], "compose", "camera", "lidar",
                              "--method", "naive")
        assert code == 0, err
        assert out.startswith("composed camera+lidar from state-") and "by naive" in out
        wait_for(lambda: client.status()["serving"]["modalities"] == BOTH)
        status = client.status()
        assert status["serving"]["composition"]["method"] == "naive"
        assert status["serving"]["composition"]["lambdas"] is None
        assert status["last_composition"]["reason"] == "operator"
        assert not any(c[0] == "start" and c[1] == ("camera", "lidar") for c in backend.calls)
        code, out, _ = _cli(capsys, daemon.endpoints["query"], "status")
        assert code == 0 and "composed    naive of state-" in out
        # no radar state (or, until radar is a known modality, no such modality): exit 1
        code, _, err = _cli(capsys, daemon.endpoints["query"], "compose", "camera", "radar")
        assert code == 1 and ("store_error" in err or "bad_request" in err), err


def _add_state(daemon, version: int, modalities: list[str], llm: str = "toy") -> None:
    """A state saved by another (toy) backend into the running daemon's store."""
    other = ToyBackend(llm=llm)
    other.version = version
    daemon.engine.store.save_state(other.save_state, {"modalities": modalities})


class _NoCompose(ToyBackend):
    compose_candidate = None  # a backend without the capability


def test_a_backend_that_cannot_compose_says_so_and_the_policy_adapts(tmp_path):
    config = _config(tmp_path, "serve", auto=False)
    _seed_store(config)
    with running_daemon(config, _NoCompose()) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        with pytest.raises(DaemonError, match="backend_error.*cannot compose"):
            client.compose(BOTH)
    config = _config(tmp_path / "auto", "serve")
    _seed_store(config)
    backend = _NoCompose()
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client:
        wait_for(lambda: client.status()["serving"]["modalities"] == BOTH)
        assert any(c[0] == "start" for c in backend.calls)


@pytest.mark.parametrize("key, value, message", [
    ("compose", "always", "adaptation.compose must be one of"),
    ("compose_method", "mean", "adaptation.compose_method must be one of"),
    ("compose_search_evals", 0, "compose_search_evals must be an integer >= 1"),
])
def test_compose_settings_are_validated(key, value, message):
    with pytest.raises(ValueError, match=message):
        DaemonConfig.from_dict({"adaptation": {key: value}})
