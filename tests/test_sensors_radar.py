"""An open modality set: the sensor registry, the radar (validation, derivation, encoder) and
the daemon ingesting, connecting, adapting and answering with it — and a third sensor
registered from this module without touching daemon/, adapt/ or aligners/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_daemon_support import ToyBackend, running_daemon, test_config, wait_for
from test_encoders import TINY  # the tiny encoder configs of the encoder tests

from adapt.connectors.base import ConnectorConfig
from adapt.connectors.mpnp import MPnPConnector
from adapt.features import FeatureSet
from aligners.model import MPnPModel
from daemon.client import Client, SensorPublisher
from daemon.config import LimitsConfig
from daemon.encoder_pool import encoder_spec
from daemon.mpnp_backend import MPnPBackend, MPnPBackendConfig
from daemon.protocol import DropReason, IngestError, decode_sensor_message, encode_sensor_message
from encoders import create_encoder, register_encoder, unregister_encoder
from encoders.base import Encoder
from mpnp.tiny import tiny_llm
from policies.context import known_modalities
from scenes.radar import MAX_RETURNS, RADAR_FIELDS, RADAR_VIEWS, object_velocities, radar_payload
from scenes.sample import CAMERA_VIEWS, Frame, ObjectAnnotation, QAItem
from scenes.sensors import (
    BufferSpec,
    Dim,
    SensorSpec,
    derive_sensors,
    get_sensor,
    register_sensor,
    sensor_names,
    unregister_sensor,
)


def _objects(rng: np.random.Generator) -> list[ObjectAnnotation]:
    moving = [ObjectAnnotation("car", (float(rng.uniform(8, 30)), 0.0, 0.8), (1.9, 4.5, 1.5),
                               0.0, "moving")]
    parked = [ObjectAnnotation("car", (float(x), -3.0, 0.8), (1.9, 4.5, 1.5), 0.0, "parked")
              for x in rng.uniform(-30, 30, int(rng.integers(1, 4)))]
    return moving + parked


def radar_frame(seed: int, frame_id: str | None = None, light: float = 1.0) -> Frame:
    """A camera + LiDAR frame with ground truth; the radar derived from it."""
    rng = np.random.default_rng(seed)
    cameras = {v: rng.integers(0, 256, (16, 32, 3), dtype=np.uint8) for v in CAMERA_VIEWS}
    az, dist = rng.uniform(-np.pi, np.pi, 200), rng.uniform(2, 30, 200)
    lidar = np.stack([dist * np.cos(az), dist * np.sin(az), rng.uniform(-1.8, 1.0, 200),
                      rng.uniform(0, 1, 200)], axis=1).astype(np.float32)
    frame = Frame.from_rig(frame_id or f"r{seed}", "scene-r", float(seed), light, cameras,
                           lidar, _objects(rng))
    return derive_sensors(frame)


# --- the registry and the radar sensor ------------------------------------------------------

def test_built_in_sensors_are_registered_and_are_the_known_modalities():
    assert {"camera", "lidar", "radar"} <= set(sensor_names())
    assert {"camera", "lidar", "radar"} <= known_modalities()
    assert get_sensor("camera").light_dependent and not get_sensor("radar").light_dependent
    with pytest.raises(ValueError, match="already registered"):
        register_sensor(get_sensor("radar"))
    with pytest.raises(ValueError, match="unknown sensor 'sonar'"):
        get_sensor("sonar")


def test_radar_returns_are_sparse_deterministic_and_ignore_light():
    day = radar_frame(3, light=1.0)
    night = radar_frame(3, light=0.0)
    payload = day.sensors["radar"]
    assert set(payload) == set(RADAR_VIEWS)
    for name in RADAR_VIEWS:
        assert payload[name].dtype == np.float32
        assert payload[name].shape[1] == len(RADAR_FIELDS)
        assert payload[name].shape[0] <= MAX_RETURNS
        np.testing.assert_array_equal(payload[name], night.sensors["radar"][name])
    again = radar_payload(day)
    for name in RADAR_VIEWS:
        np.testing.assert_array_equal(again[name], payload[name])
    assert radar_payload(Frame.from_rig("x", "s", 0.0, 1.0, day.cameras, day.lidar)) is None


def test_radial_velocity_separates_moving_from_parked():
    moving_v, parked_v = [], []
    for seed in range(20):
        frame = radar_frame(seed)
        speeds = np.hypot(*object_velocities(frame).T)
        assert all((s > 2.0) == (o.status == "moving") for o, s in zip(frame.objects, speeds))
        front = frame.sensors["radar"]["RADAR_FRONT"]
        ahead = front[(np.abs(front[:, 1]) < 1.5) & (front[:, 0] > 6)]  # the moving car
        parked = np.concatenate(list(frame.sensors["radar"].values()))
        parked = parked[np.abs(parked[:, 1] + 3.0) < 1.5]  # the parking strip
        moving_v.extend(np.abs(ahead[:, 3]))
        parked_v.extend(np.abs(parked[:, 3]))
    assert len(moving_v) > 5 and len(parked_v) > 5
    assert np.median(moving_v) > 2.5 and np.median(parked_v) < 0.5


def test_a_stored_world_without_radar_gains_it_when_loaded(tmp_path):
    from scenes.dataset import QADataset
    from scenes.synthetic import WorldConfig, generate_world

    world = generate_world(WorldConfig(day_frames=4, night_frames=2, frames_per_scene=2,
                                       questions_per_frame=2, image_height=16, image_width=24,
                                       lidar_width=64), tmp_path / "w", progress=False,
                           workers=1)
    data = QADataset.load(world, "train")
    frame_id = data.frame_ids[0]
    path = next((world / "train" / "frames").glob(f"{frame_id}.npz"))
    with np.load(path) as stored:
        assert not any(key.startswith("radar") or key.startswith("RADAR") for key in stored)
    frame = data.frame(frame_id)
    assert set(frame.sensors) == {"camera", "lidar", "radar"}
    frame.validate()


def _radar_message(arrays=None, **header):
    frame = radar_frame(1)
    parts = encode_sensor_message("radar", "r1", 1.0, arrays or dict(frame.sensors["radar"]))
    if header:
        body = json.loads(parts[0])
        body.update(header)
        parts[0] = json.dumps(body).encode()
    return parts


def test_radar_messages_are_validated_against_the_descriptor():
    limits = LimitsConfig()
    message = decode_sensor_message(_radar_message(), limits)
    assert message.sensor == "radar" and set(message.arrays) == set(RADAR_VIEWS)
    good = dict(radar_frame(1).sensors["radar"])

    def dropped(parts) -> DropReason:
        with pytest.raises(IngestError) as info:
            decode_sensor_message(parts, limits)
        return info.value.reason

    assert dropped(_radar_message({**good, "RADAR_FRONT": good["RADAR_FRONT"].astype(
        np.float64)})) is DropReason.BAD_DTYPE
    assert dropped(_radar_message({**good, "RADAR_FRONT": good["RADAR_FRONT"][:, :4].copy()})
                   ) is DropReason.BAD_SHAPE
    assert dropped(_radar_message({**good, "RADAR_FRONT": np.zeros((5000, 5), np.float32)})
                   ) is DropReason.BAD_SHAPE
    nan = good["RADAR_FRONT"].copy()
    nan[0, 3] = np.nan
    assert dropped(_radar_message({**good, "RADAR_FRONT": nan})) is DropReason.NON_FINITE
    fewer = {k: v for k, v in good.items() if k != "RADAR_BACK_LEFT"}
    assert dropped(_radar_message(fewer)) is DropReason.BUFFER_MISMATCH
    renamed = {("RADAR_TOP" if k == "RADAR_FRONT" else k): v for k, v in good.items()}
    assert dropped(_radar_message(renamed)) is DropReason.BUFFER_MISMATCH
    parts = _radar_message()
    parts[1] = bytes(parts[1])[:-4]
    assert dropped(parts) is DropReason.TRUNCATED
    assert dropped(_radar_message(sensor="sonar")) is DropReason.UNKNOWN_SENSOR


def test_the_radar_encoder_reads_velocity():
    encoder = create_encoder("radar-pointnet", **TINY["radar-pointnet"]).freeze()
    frames = [radar_frame(s) for s in range(3)]
    tokens = encoder.encode(frames)
    assert tokens.shape == (3, encoder.num_tokens, encoder.dim) and torch.isfinite(tokens).all()
    still = radar_frame(0)
    for name, points in still.sensors["radar"].items():
        points = points.copy()
        points[:, 3] = 0.0
        still.sensors["radar"][name] = points
    assert not torch.allclose(encoder.encode([still]), tokens[:1])
    empty = Frame.from_rig("e", "s", 0.0, 1.0, frames[0].cameras, frames[0].lidar)
    assert torch.isfinite(encoder.encode([empty])).all()  # a frame without radar data
    # creating an encoder leaves the process's random stream alone
    before = torch.get_rng_state()
    create_encoder("radar-pointnet", **TINY["radar-pointnet"])
    assert torch.equal(before, torch.get_rng_state())


def test_radar_pretraining_augmentation_keeps_inputs_and_targets_consistent():
    from encoders.targets import region_counts

    encoder = create_encoder("radar-pointnet", **TINY["radar-pointnet"])
    frames = [radar_frame(s) for s in range(4)]
    x = encoder.preprocess(frames)
    y = torch.from_numpy(region_counts(frames, "bands", 4))
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        ax, ay = encoder.augment(x, y, gen)
        assert torch.equal(ax[..., -1] >= 0, x[..., -1] >= 0)
        assert torch.allclose(ax[..., 6], x[..., 6])  # radial velocity does not rotate
        # every rotated point's cell agrees with its rotated position
        valid = ax[..., -1] >= 0
        metres = ax[valid][:, :2].numpy().astype(np.float64) * encoder.config.max_range
        cells = encoder.cells(metres)
        assert np.mean(cells == ax[valid][:, -1].numpy()) > 0.97  # band edges round


# --- the daemon with the toy backend ------------------------------------------------------

def test_the_daemon_ingests_connects_and_answers_with_radar(tmp_path):
    backend = ToyBackend()
    # compose off: camera + radar is adapted here (composition has its own tests)
    config = test_config(tmp_path, adaptation={"compose": "off"})
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"]) as client, \
            SensorPublisher(daemon.endpoints["ingest"], hwm=50) as publisher:
        frame = radar_frame(5, "radar-5")
        wait_for(lambda: publisher.send_camera(frame) and publisher.send_sensor(frame, "radar")
                 and daemon.metrics.frames_in.total() >= 2)
        assert client.status()["counters"]["frames_in"]["radar"] >= 1
        client.set_modality("forced", ["radar"])
        wait_for(lambda: client.status()["serving"]["modalities"] == ["radar"])
        assert ("start", ("radar",), 8, 20) in backend.calls
        reply = client.ask("q")
        assert reply["modalities"] == ["radar"] and reply["answer"] == "q|radar|v1|radar-5"
        client.set_modality("forced", ["camera", "radar"])
        wait_for(lambda: client.status()["serving"]["modalities"] == ["camera", "radar"])
        assert client.ask("q", "radar-5")["answer"] == "q|camera+radar|v2|radar-5"


# --- the real backend on tiny parts, with radar and with a sensor of this module ----------

def _featureset(encoders, seeds, prefix: str, make) -> FeatureSet:
    frames = [make(s, f"{prefix}{s}") for s in seeds]
    items = [QAItem(f.frame_id, "is there a car?", "yes" if i % 2 else "no", "exist", 0)
             for i, f in enumerate(frames)]
    tokens = {m: {f.frame_id: e.encode([f])[0] for f in frames} for m, e in encoders.items()}
    return FeatureSet(items, tokens)


def tiny_backend(extra: dict[str, Encoder], make=radar_frame) -> MPnPBackend:
    torch.manual_seed(0)
    llm, tok = tiny_llm("llama", num_layers=4)
    encoders = {"camera": create_encoder("camera-vit", **TINY["camera-vit"]).freeze(), **extra}
    model = MPnPModel(llm, tok)
    specs = {m: encoder_spec(e) for m, e in encoders.items()}
    serving = MPnPConnector(llm, tok, [specs["camera"]], ConnectorConfig(num_blocks=2),
                            model=model, state_name="day")
    splits = SimpleNamespace(**{f"{c}_{s}": _featureset(encoders, range(k, k + 4), f"{c}{s}",
                                                        make)
                                for k, (c, s) in enumerate([(c, s) for c in ("day", "night")
                                                            for s in ("train", "val")])})
    prepared = SimpleNamespace(encoders=encoders, record={}, data_dir=None)
    config = MPnPBackendConfig(val_questions=4, eval_chunk=2, max_new_tokens=2, micro_batch=1)
    return MPnPBackend(config, model, serving, prepared, splits)


def _serve_adapt_answer(tmp_path, backend, sensor: str, frame: Frame) -> None:
    config = test_config(tmp_path, adaptation={"auto": False, "target_steps": 2,
                                               "batch_size": 1, "min_steps": 1})
    with running_daemon(config, backend) as daemon, \
            Client(daemon.endpoints["query"], timeout_s=30) as client, \
            SensorPublisher(daemon.endpoints["ingest"]) as publisher:
        wait_for(lambda: publisher.send_camera(frame) and publisher.send_sensor(frame, sensor)
                 and daemon.metrics.frames_in.total() >= 2)
        assert client.ask("is there a car?", frame.frame_id)["modalities"] == ["camera"]
        client.adapt("start", [sensor], force_commit=True)
        wait_for(lambda: client.status()["serving"]["modalities"] == [sensor], timeout=60)
        assert client.status()["last_adaptation"]["outcome"] in ("better", "forced")
        reply = client.ask("is there a car?", frame.frame_id)
        assert reply["modalities"] == [sensor] and reply["frame_id"] == frame.frame_id
        kinds = {e["name"] for e in client.list_store()["entries"]}
        assert f"encoder-{sensor}" in kinds  # reconnected from the store


def test_the_real_backend_adapts_to_radar_and_answers_with_it(tmp_path):
    radar = create_encoder("radar-pointnet", **TINY["radar-pointnet"]).freeze()
    backend = tiny_backend({"radar": radar})
    _serve_adapt_answer(tmp_path, backend, "radar", radar_frame(9, "live-9"))
    assert backend.serving.modality_names == ["radar"]


@dataclass
class SonarConfig:
    tokens: int = 2
    dim: int = 8
    seed: int = 0


class SonarEncoder(Encoder):
    """Twelve ultrasonic ranges -> two tokens (this module's own sensor and encoder)."""

    kind = "sonar-test"
    modality = "sonar"
    sensor = "sonar"
    config_class = SonarConfig

    def __init__(self, config: SonarConfig) -> None:
        super().__init__(config)
        self.proj = torch.nn.Linear(12, config.tokens * config.dim)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(config.seed)
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen) * 0.1)
            self.proj.bias.zero_()

    @property
    def num_tokens(self) -> int:
        return self.config.tokens

    @property
    def dim(self) -> int:
        return self.config.dim

    def preprocess(self, frames):
        return torch.from_numpy(np.stack([f.payload("sonar")["ranges"] if
                                          f.payload("sonar")["ranges"].size else
                                          np.zeros(12, np.float32) for f in frames]))

    def forward(self, x):
        return self.proj(x / 5.0).reshape(x.shape[0], self.config.tokens, self.config.dim)

    def example_input(self, batch: int = 1):
        return torch.zeros(batch, 12)


@pytest.fixture
def sonar():
    register_sensor(SensorSpec(name="sonar", buffers=(
        BufferSpec("ranges", "float32", (Dim(exact=12),)),), description="12 ranges, m"))
    register_encoder(SonarEncoder.kind, SonarEncoder)
    try:
        yield create_encoder(SonarEncoder.kind).freeze()
    finally:
        unregister_encoder(SonarEncoder.kind)
        unregister_sensor("sonar")


def sonar_frame(seed: int, frame_id: str | None = None) -> Frame:
    frame = radar_frame(seed, frame_id)
    ranges = np.random.default_rng(seed).uniform(0.2, 5.0, 12).astype(np.float32)
    frame.sensors["sonar"] = {"ranges": ranges}
    return frame


def test_a_sensor_registered_here_works_end_to_end(tmp_path, sonar):
    """No file of daemon/, adapt/ or aligners/ names the sonar: its descriptor and encoder
    above are all it takes for the daemon to validate, ingest, connect, adapt and answer."""
    assert "sonar" in known_modalities()
    bad = encode_sensor_message("sonar", "s", 1.0, {"ranges": np.zeros(11, np.float32)})
    with pytest.raises(IngestError) as info:
        decode_sensor_message(bad, LimitsConfig())
    assert info.value.reason is DropReason.BAD_SHAPE
    backend = tiny_backend({"sonar": sonar}, make=sonar_frame)
    _serve_adapt_answer(tmp_path, backend, "sonar", sonar_frame(11, "live-11"))



def test_the_simulated_vehicle_sends_radar_when_asked(tmp_path):
    from daemon.sim_vehicle import SimVehicle, SimVehicleConfig, SyntheticFrameSource

    with pytest.raises(ValueError, match="unknown sensor 'sonar'"):
        SimVehicleConfig(sensors_hz={"sonar": 5.0})
    source = SyntheticFrameSource(image_height=16, image_width=24, lidar_width=64)
    with running_daemon(test_config(tmp_path)) as daemon:
        config = SimVehicleConfig(endpoint=daemon.endpoints["ingest"], duration_s=1.0,
                                  sensors_hz={"radar": 10.0})
        stats = SimVehicle(config, source).run()
        assert stats.sensors_sent.get("radar", 0) >= 3
        wait_for(lambda: daemon.metrics.frames_in.value(sensor="radar") >= 3)
        assert daemon.metrics.frames_dropped.total() == 0
