"""The real ``mpnp`` backend (tiny parts) trains on live samples: object-list samples
buffered on disk, their frames' stored sensors encoded by the encoder pool, validation on
the buffer's newest frames; and its teacher confidences."""

from __future__ import annotations

import pytest
import torch
from test_daemon_mpnp_backend import _frame, make_backend

from daemon.samples import LiveSamples
from daemon.teaching import object_samples
from scenes.questions import AnswerBalancer
from scenes.sample import ObjectAnnotation


def _objects(seed: int) -> list[ObjectAnnotation]:
    return [ObjectAnnotation("car", (5.0 + seed, 2.0, 0.0), (1.9, 4.5, 1.5), 0.0, "parked"),
            ObjectAnnotation("pedestrian", (-3.0, -4.0 - seed, 0.0), (0.6, 0.5, 1.7), 0.0,
                             "moving")][: 1 + seed % 2]


def _live(tmp_path, mode: str, frames: int = 5, per_frame: int = 3) -> LiveSamples:
    import numpy as np

    live = LiveSamples(tmp_path / "samples", 10**9, 10**6, min_samples=6,
                       val_fraction=0.2, mode=mode)
    balancer = AnswerBalancer(np.random.default_rng(0))
    for seed in range(frames):
        frame = _frame(100 + seed, f"live{seed}")
        live.add("night", frame, object_samples(frame, _objects(seed), balancer, per_frame))
    return live


@pytest.mark.parametrize("mode", ["live", "live+world"])
def test_adapting_on_buffered_object_list_samples(tmp_path, mode):
    backend = make_backend()
    backend.use_live_samples(_live(tmp_path, mode))
    world_train = len(backend.splits.night_train)
    backend.start_adaptation(frozenset({"lidar"}), n_blocks=2, steps=2, batch_size=2)
    info = backend.data_info
    assert info["source"] == mode and info["context"] == "night" and info["frames"] == 5
    assert info["live_train"] == 12 and info["live_val"] == 3  # the newest frame held out
    assert info["train"] == 12 + (world_train if mode == "live+world" else 0)
    assert info["val"] == 3 and info["sample_sources"] == {"objects": 15}
    assert {item.frame_id for item in backend._job.val.items} == {"live:live4@104.0"}
    while backend.adaptation_step() is not None:
        pass
    assert 0.0 <= backend.validation_accuracy("adapted") <= 1.0
    backend.commit_adapted()
    assert backend.serving.modality_names == ["lidar"]
    assert backend.last_report["data"]["source"] == mode


def test_too_few_live_samples_fall_back_to_the_world(tmp_path):
    backend = make_backend()
    backend.use_live_samples(_live(tmp_path, "live", frames=1))
    backend.start_adaptation(frozenset({"lidar"}), n_blocks=2, steps=1, batch_size=1)
    assert backend.data_info["source"] == "world"


def test_teacher_confidence_is_the_first_token_probability():
    backend = make_backend()
    frames = [_frame(1), _frame(2)]
    questions = ["Are there any cars?", "How many cars are there?"]
    answers, confidences = backend.answer_with_confidence(questions, frames,
                                                          frozenset({"camera"}))
    assert answers == backend.answer(questions, frames, frozenset({"camera"}))
    assert all(0.0 < c <= 1.0 for c in confidences)
    with pytest.raises(RuntimeError):
        backend.answer_with_confidence(questions, frames, frozenset({"lidar"}))
    assert torch.is_grad_enabled()


def test_the_daemon_adapts_the_real_backend_on_object_lists_it_was_sent(tmp_path):
    from test_daemon_support import running_daemon, test_config, wait_for

    from daemon.client import Client, SensorPublisher

    backend = make_backend()
    config = test_config(tmp_path, adaptation={"auto": False, "target_steps": 2,
                                               "batch_size": 1, "min_steps": 1,
                                               "data": "live", "min_samples": 6},
                         samples={"questions_per_frame": 3})
    boxes = [{"class": "car", "status": "parked", "x": 6.0, "y": 2.0, "z": 0.0,
              "length": 4.5, "width": 1.9, "height": 1.5, "yaw": 0.0}]
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"], timeout_s=30) as client, \
            SensorPublisher(daemon.endpoints["ingest"], hwm=50) as publisher:
        for seed in range(3):
            frame = _frame(50 + seed, f"drive-{seed}")
            publisher.send_camera(frame)
            publisher.send_lidar(frame)
        wait_for(lambda: daemon.metrics.frames_in.total() >= 6)
        for seed in range(3):
            reply = client.objects(f"drive-{seed}", boxes[: seed % 2 + 1] if seed else [],
                                   context="night")
            assert reply["stored"] == 3
        client.adapt("start", ["lidar"], force_commit=True)
        wait_for(lambda: client.status()["serving"]["modalities"] == ["lidar"], timeout=60)
        data = client.status()["adaptation_cost"]["data"]
        assert data["source"] == "live" and data["context"] == "night"
        assert data["live_train"] == 6 and data["live_val"] == 3 and data["frames"] == 3
        assert data["sample_sources"] == {"objects": 9}
