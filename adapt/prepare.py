"""Algorithm 1, offline stage: what a vehicle ships with before it ever sees the night.

1. a driving dataset (the synthetic world, generated once into the model store);
2. frozen encoders (pretrained on that world once — no downloadable weights here);
3. Select camera → Reconnect → Train camera aligners + latent connections + K/V LoRA on
   *day* camera data, saved as an adapted state in the store.

Everything is kept in the model store (``$MPNP_HOME`` or ``~/.cache/mpnp``) and reused on
the next run: re-running ``mpnp prepare`` only redoes a step whose inputs changed.

Store layout::

    worlds/<name>/             generated world (scenes/README.md)
    encoders/<kind>/           pretrained frozen encoders
    features/                  encoder outputs per frame, keyed by encoder fingerprint
    states/day-camera/         the offline adapted state (aligners/state.py format)
    states/day-camera/prepare.json   how it was made and its day/night accuracy
    states/offline-aligners/   text-anchored aligners of the other sensors (when the recipe
                               anchors: ``adapt/recipe.py``), which runtime Adapt starts from
    demo-quick/                the quick offline stage (:meth:`PrepareConfig.quick`, built by
                               ``mpnp demo --quick`` where the above is missing): the same
                               layout, its own world, encoders, features and day state
                               (the LLM stays in the main store's ``llm/``)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from adapt.connectors.base import ConnectorConfig
from adapt.connectors.mpnp import MPnPConnector
from adapt.data import load_splits, modality_specs
from adapt.evaluate import evaluate
from adapt.recipe import ALIGNER_STATE, PAPER, Recipe, anchor_state, pretrain_aligners
from adapt.recipe import DEFAULT as DEFAULT_RECIPE
from adapt.trainer import TrainConfig, Trainer
from aligners.model import MPnPModel
from aligners.state import StateError, load_state, save_state
from encoders.base import Encoder
from encoders.cache import FeatureCache
from encoders.pretrain import PretrainConfig, ensure_pretrained
from mpnp.files import atomic_write_text
from mpnp.paths import model_store_dir
from scenes.dataset import QADataset
from scenes.synthetic import WorldConfig, generate_world

log = logging.getLogger(__name__)

DAY_STATE = "day-camera"
RECORD_FILE = "prepare.json"
#: Learning rates for short runs on a CPU (the official 2e-5 on aligners needs the paper's
#: many more steps; these are the project's defaults for runtime adaptation).
FAST_LEARNING_RATES: dict[str, float] = {
    "aligners": 1e-3, "lora": 5e-4, "connections": 1e-1,
    "llm": 5e-5, "projection": 1e-3, "prompts": 1e-3,
}


#: The quick offline stage (:meth:`PrepareConfig.quick`): world size, encoder epochs, day
#: state questions and epochs, and its duration on a busy 2-core CPU at 1 torch thread (as
#: ``mpnp demo`` runs), extrapolated from measured pieces: world 0.15 s/frame on one worker,
#: 0.12 on two (~85-110 s for 720 frames), 1-epoch pretraining of the three encoders 0.08
#: s/train frame (~50 s), frame features 0.05 s/frame (~35 s), the day state ~6 training
#: samples/s and ~0.1 s per scored question (~100 s): about 5 minutes. Measured end to end
#: from a fresh store on an otherwise idle 2-core machine: 3 min 3 s (world 40 s, encoders
#: 44 s, features 20 s, day state 62 s).
#: ``min_eval_scenes`` 16 instead of 40 leaves most of the small world to training (val and
#: test: 16 drives per light kind each, still hundreds of questions).
QUICK_WORLD: dict[str, int] = {"day_frames": 480, "night_frames": 240, "min_eval_scenes": 16}
QUICK_PRETRAIN_EPOCHS = 1
QUICK_DAY_SAMPLES = 240
QUICK_DAY_EPOCHS = 2
QUICK_VAL_SAMPLES = 32
QUICK_TEST_SAMPLES = 64
QUICK_ESTIMATE_MIN = "3-6"


#: :attr:`adapt.trainer.TrainConfig.autocast` of the project's runs (the offline stage,
#: Table 1, the grounding check and the daemon's Adapt): bfloat16 where the device has the
#: units for it. Measured on SmolLM2 (README, Adaptation): the same accuracy as float32 on the
#: grounding check (54.8 against 55.1 %, loss 0.977 against 0.978) and a 1.4x faster
#: training step side by side (``mpnp bench savings``), up to 2x on long prompts.
DEFAULT_AUTOCAST = "auto"


def fast_train_config(**overrides) -> TrainConfig:
    """The project's training defaults for on-device adaptation runs."""
    base = {"epochs": 3, "batch_size": 16, "patience": 1,
            "learning_rates": dict(FAST_LEARNING_RATES), "autocast": DEFAULT_AUTOCAST}
    return TrainConfig(**(base | overrides))


def default_extra_encoders(taken: tuple[str, ...] = ("camera", "lidar")) -> dict[str, str]:
    """Sensor -> encoder kind for every registered sensor encoder whose sensor is not in
    ``taken`` (the first kind by name per sensor): a sensor plugged in with an encoder is
    pretrained and loaded by the offline stage without naming it here."""
    from encoders import encoder_class, sensor_encoders

    out: dict[str, str] = {}
    for kind in sensor_encoders():
        sensor = encoder_class(kind).sensor
        if sensor is not None and sensor not in taken:
            out.setdefault(sensor, kind)
    return out


@dataclass
class PrepareConfig:
    """What the offline stage builds.

    Attributes:
        world: the synthetic world to generate (ignored when ``data_dir`` is given).
        data_dir: an existing dataset directory (generated world or nuScenes-QA) instead.
        encoders: modality -> encoder kind (the day state's record covers these).
        extra_encoders: modality -> encoder kind of further sensors, pretrained and loaded
            with the others for runtime adaptation but outside the day state's digest and
            record: adding a sensor here never retrains the day (camera) state.
        pretrain: encoder kind -> pretraining config (``None``: the kind's defaults).
        num_blocks: N of the offline state.
        day_samples: cap on the day training questions (``None``: all) — a CPU budget.
        val_samples: validation questions for early stopping (a fixed random subset of the
            day val split; ``None``: all of it — every epoch answers them all).
        test_samples: questions per context (day / night test) for the record's accuracy
            (``None``: the whole split).
        train: how the day state is trained.
        recipe: how mPnP states connect and start (``adapt/recipe.py``), the same one Table
            1 measures; with anchoring, the day state's camera aligners are text-anchored
            before training and the other sensors' aligners are anchored into
            ``states/offline-aligners`` for runtime Adapt (Algorithm 1).
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    data_dir: str | None = None
    encoders: dict[str, str] = field(
        default_factory=lambda: {"camera": "camera-vit", "lidar": "lidar-rangevit"}
    )
    extra_encoders: dict[str, str] = field(default_factory=lambda: default_extra_encoders())
    pretrain: dict[str, PretrainConfig | None] = field(default_factory=dict)
    num_blocks: int = 12
    day_samples: int | None = 1200
    val_samples: int | None = 200
    test_samples: int | None = 400
    train: TrainConfig = field(default_factory=fast_train_config)
    recipe: Recipe = field(default_factory=lambda: replace(DEFAULT_RECIPE))

    def __post_init__(self) -> None:
        if "camera" not in self.encoders:
            raise ValueError("PrepareConfig.encoders needs a camera encoder (the offline stage)")
        if self.num_blocks < 1:
            raise ValueError(f"PrepareConfig.num_blocks must be >= 1, got {self.num_blocks}")
        for name in ("day_samples", "val_samples", "test_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"PrepareConfig.{name} must be >= 1 or None")

    @classmethod
    def quick(cls) -> PrepareConfig:
        """The *quick offline stage* (``mpnp demo --quick`` where nothing was prepared).

        The same pipeline as the default, smaller: a world of :data:`QUICK_WORLD`'s frames
        (the default world's image, LiDAR and radar geometry, question templates and light
        ranges, so the demo's live frames fit its encoders), every encoder pretrained
        :data:`QUICK_PRETRAIN_EPOCHS` epoch on that world's train split (``corpus=None``,
        which is also the default: no separate corpus is generated), the day camera
        state trained on :data:`QUICK_DAY_SAMPLES` day questions and scored on
        :data:`QUICK_TEST_SAMPLES` per context. About :data:`QUICK_ESTIMATE_MIN` minutes on
        a 2-core CPU instead of the default's 30-45; its products are for a first look, not
        for measurements (see ``daemon.offline_stage``: they live in a sub-store).
        """
        return cls(
            world=WorldConfig(**QUICK_WORLD),
            pretrain={kind: PretrainConfig(epochs=QUICK_PRETRAIN_EPOCHS)
                      for kind in cls().encoder_kinds()},
            day_samples=QUICK_DAY_SAMPLES, val_samples=QUICK_VAL_SAMPLES,
            test_samples=QUICK_TEST_SAMPLES,
            train=fast_train_config(epochs=QUICK_DAY_EPOCHS),
        )

    def encoder_kinds(self) -> list[str]:
        """Every encoder kind this configuration pretrains (day state's and extra), sorted."""
        return sorted({*self.encoders.values(), *self.extra_encoders.values()})

    def describe(self) -> str:
        """What this configuration builds, in one line (for progress messages)."""
        from encoders.pretrain import pretrain_epochs

        world = (f"the dataset in {self.data_dir}" if self.data_dir else
                 f"a world of {self.world.day_frames + self.world.night_frames:,} frames "
                 f"({self.world.day_frames:,} day / {self.world.night_frames:,} night)")
        epochs = {kind: pretrain_epochs(kind, self.pretrain.get(kind))
                  for kind in self.encoder_kinds()}
        if len(set(epochs.values())) == 1:
            pretrain = (f"{next(iter(epochs.values()))}-epoch encoders "
                        f"({', '.join(epochs)})")
        else:
            pretrain = "encoders (" + ", ".join(f"{k} {n}" for k, n in epochs.items()) + \
                " epochs)"
        day = (f"{self.day_samples:,}" if self.day_samples is not None else "all")
        return (f"{world}, {pretrain}, the day camera state on {day} day questions x "
                f"{self.train.epochs} epochs (N={self.num_blocks})")

    def digest(self) -> str:
        """A short hash of everything that shapes the day state (not ``extra_encoders``)."""
        fields = asdict(self)
        fields.pop("extra_encoders")
        # bfloat16 autocast changes the arithmetic's precision, not what is trained (equal
        # accuracy, measured): a day state trained either way stays valid. The record says
        # which one trained it.
        fields["train"].pop("autocast")
        if self.recipe == PAPER:  # day states made before recipes existed stay valid
            fields.pop("recipe")
        text = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Prepared:
    """Where the offline stage's products are, and the encoders, loaded."""

    store_dir: Path
    data_dir: Path
    encoders: dict[str, Encoder]
    state_dir: Path
    record: dict

    @property
    def aligners_dir(self) -> Path | None:
        """The offline aligners of the other sensors (``None``: the recipe has none)."""
        directory = self.store_dir / "states" / ALIGNER_STATE
        return directory if (directory / "state.json").is_file() else None

    def feature_cache(self) -> FeatureCache:
        return FeatureCache(self.store_dir / "features")


def world_dir_for(config: WorldConfig, store: Path) -> Path:
    """``worlds/default`` for the default world, ``worlds/w-<hash>`` for any other."""
    if config == WorldConfig():
        return store / "worlds" / "default"
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    return store / "worlds" / f"w-{digest[:12]}"


def ensure_world(config: WorldConfig, store: Path, progress: bool = True) -> Path:
    path = world_dir_for(config, store)
    if (path / "manifest.json").is_file():
        log.info("reusing the world in %s", path)
        return path
    log.info("generating the synthetic world into %s", path)
    return generate_world(config, path, progress=progress)


def ensure_encoders(config: PrepareConfig, data_dir: Path, store: Path,
                    progress: bool = True, extra: bool = True) -> dict[str, Encoder]:
    """The pretrained encoders of ``config.encoders`` (and, with ``extra``, of
    ``config.extra_encoders``) by modality, pretrained first where missing."""
    kinds = {**config.encoders, **(config.extra_encoders if extra else {})}
    return {modality: ensure_pretrained(kind, data_dir, store, config.pretrain.get(kind),
                                        progress=progress)
            for modality, kind in kinds.items()}


def ensure_prepared(store_dir: str | os.PathLike[str] | None = None,
                    config: PrepareConfig | None = None, *, llm=None, tokenizer=None,
                    model_path: str | None = None, progress: bool = True,
                    force: bool = False) -> Prepared:
    """Run (or reuse) the offline stage; see the module docstring.

    Args:
        store_dir: the model store (default: ``$MPNP_HOME`` or ``~/.cache/mpnp``).
        config: what to build.
        llm, tokenizer: a resident LLM to train on (else ``model_path`` is loaded).
        model_path: an LLM directory/GGUF; ``None`` = the embedded SmolLM2.
        force: retrain the day state even if a matching one exists.
    """
    config = config or PrepareConfig()
    store = model_store_dir(store_dir)
    data_dir = Path(config.data_dir) if config.data_dir else ensure_world(config.world, store,
                                                                            progress)
    encoders = ensure_encoders(config, data_dir, store, progress)
    state_dir = store / "states" / DAY_STATE
    record_path = state_dir / RECORD_FILE
    digest = config.digest()
    if not force and record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
        fingerprints = {m: e.fingerprint() for m, e in encoders.items()
                        if m in config.encoders}
        if record.get("config_digest") == digest and record.get("encoders") == fingerprints:
            log.info("reusing the day state in %s", state_dir)
            return Prepared(store, data_dir, encoders, state_dir, record)
    if llm is None:
        from mpnp.llm import load_llm

        llm, tokenizer = load_llm(model_path, store=store)
    day_encoders = {m: e for m, e in encoders.items() if m in config.encoders}
    record = train_day_state(config, data_dir, day_encoders, FeatureCache(store / "features"),
                             llm, tokenizer, state_dir, progress)
    record["config_digest"] = digest
    atomic_write_text(record_path, json.dumps(record, indent=2))
    return Prepared(store, data_dir, encoders, state_dir, record)


def train_day_state(config: PrepareConfig, data_dir: Path, encoders: dict[str, Encoder],
                    cache: FeatureCache, llm, tokenizer, state_dir: Path,
                    progress: bool = True) -> dict:
    """Train the camera state on day data and save it; returns its record."""
    splits = load_splits(data_dir, encoders, cache, progress=progress)
    specs = modality_specs(encoders)
    train = splits.day_train
    train = train.at_most(config.day_samples, seed=config.train.seed)
    model = MPnPModel(llm, tokenizer)
    connector = MPnPConnector(
        llm, tokenizer, [specs["camera"]], ConnectorConfig(num_blocks=config.num_blocks),
        model=model, state_name=DAY_STATE,
        connection=config.recipe.connection(config.num_blocks),
    )
    frames = QADataset.load(data_dir, "train")
    anchoring = {}
    if config.recipe.anchor is not None:
        log.info("offline stage: text-anchoring the camera aligners")
        anchoring["camera"] = anchor_state(model, "camera", encoders["camera"], train,
                                           frames.frame, config.recipe, progress=progress,
                                           autocast=config.train.autocast).to_dict()
    log.info("offline stage: training the camera state (N=%d, %s) on %d day questions",
             config.num_blocks, config.recipe.describe(), len(train))
    seed = config.train.seed
    report = Trainer(connector, config.train).fit(
        train, splits.day_val.at_most(config.val_samples, seed), progress=progress)
    day = evaluate(connector, splits.day_test.at_most(config.test_samples, seed))
    night = evaluate(connector, splits.night_test.at_most(config.test_samples, seed))
    save_state(model, state_dir, DAY_STATE)
    log.info("day state: day accuracy %.3f, night accuracy %.3f", day.accuracy, night.accuracy)
    others = [m for m in encoders if m != "camera"]
    if config.recipe.anchor is not None and others:
        log.info("offline stage: text-anchoring the aligners of %s in every block", others)
        anchoring.update({f"offline {m}": r for m, r in pretrain_aligners(
            model, specs, encoders, train, frames.frame, config.recipe,
            model.geometry.num_layers, others, progress=progress,
            autocast=config.train.autocast).items()})
        save_state(model, state_dir.parent / ALIGNER_STATE, ALIGNER_STATE)
    return {
        "state": DAY_STATE, "num_blocks": config.num_blocks, "data_dir": str(data_dir),
        "encoders": {m: e.fingerprint() for m, e in encoders.items()},
        "encoder_kinds": dict(config.encoders),
        "train": report.to_dict(), "day_accuracy": day.accuracy,
        "night_accuracy": night.accuracy, "day_questions": len(train),
        "day_ci95": list(day.ci95), "night_ci95": list(night.ci95),
        "test_questions": {"day": day.count, "night": night.count},
        "recipe": config.recipe.describe(), "anchoring": anchoring,
        "autocast": config.train.autocast,
    }


def open_prepared(store_dir: str | os.PathLike[str] | None = None) -> Prepared:
    """What ``mpnp prepare`` left in the store, whatever configuration made it.

    Raises:
        FileNotFoundError: nothing prepared yet (run ``mpnp prepare``).
        ValueError: an encoder changed since the day state was trained on its tokens.
    """
    from encoders.base import load_encoder
    from encoders.pretrain import encoder_dir

    store = model_store_dir(store_dir)
    state_dir = store / "states" / DAY_STATE
    record_path = state_dir / RECORD_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} is missing: run `mpnp prepare` first")
    record = json.loads(record_path.read_text())
    kinds = record.get("encoder_kinds") or PrepareConfig().encoders
    encoders = {}
    for modality, fingerprint in record["encoders"].items():
        directory = encoder_dir(kinds[modality], store)
        encoder = load_encoder(directory)
        if encoder.fingerprint() != fingerprint:
            raise ValueError(f"{directory} changed since the day state was trained on its "
                             "tokens; run `mpnp prepare --force`")
        encoders[modality] = encoder
    data_dir = Path(record["data_dir"])
    for modality, kind in default_extra_encoders(tuple(encoders)).items():
        # further sensors: the one in the store, else pretrained on the same world once
        try:
            encoders[modality] = load_encoder(encoder_dir(kind, store))
        except (FileNotFoundError, ValueError) as exc:
            log.info("no usable %s encoder in the store (%s): pretraining it", kind, exc)
            encoders[modality] = ensure_pretrained(kind, data_dir, store, progress=False)
    return Prepared(store, data_dir, encoders, state_dir, record)


def load_day_connector(prepared: Prepared, model: MPnPModel,
                       config: ConnectorConfig | None = None) -> MPnPConnector:
    """The offline state, loaded into ``model`` and wrapped as a connector."""
    try:
        name = load_state(model, prepared.state_dir, name=DAY_STATE)
    except StateError as exc:
        raise StateError(f"{exc}; run `mpnp prepare --force` to rebuild it") from exc
    if prepared.aligners_dir is not None and ALIGNER_STATE not in model.states:
        try:  # the other sensors' offline aligners, which runtime Adapt starts from
            load_state(model, prepared.aligners_dir, name=ALIGNER_STATE, activate=False)
        except StateError as exc:
            log.warning("offline aligners in %s not loaded (%s): new sensors start from "
                        "fresh aligners", prepared.aligners_dir, exc)
    model.activate(name)
    state = model.states[name]
    cfg = config or ConnectorConfig(num_blocks=state.config.num_blocks)
    return MPnPConnector(model.llm, model.tokenizer, state.modalities, cfg, model=model,
                         state_name=name)
