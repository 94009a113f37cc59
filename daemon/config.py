"""The daemon's configuration: a TOML (or JSON) file mapped onto validated dataclasses.

Importable without torch or zmq so tools (and ``deploy`` tests) can validate configs cheaply.
Every section is a dataclass validated in ``__post_init__``; unknown keys are errors that name
the section and key. Security rule: any endpoint that is not loopback or ``ipc://`` needs
CURVE (``security.curve = true`` with a server key and a directory of authorized client keys).
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mpnp.paths import model_store_dir
from policies.budget import PlannerConfig
from policies.context import create_policy, modality_set
from recording.writer import RecordingSettings

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def host_is_loopback(host: str) -> bool:
    """True for ``localhost`` or a literal loopback IP (``127.0.0.0/8``, ``::1``).

    A parsed address, not a string prefix: ``127.attacker.example`` is a DNS name that can
    resolve anywhere, so it is not loopback."""
    if host == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_is_local(endpoint: str) -> bool:
    """True for ``ipc://``, ``inproc://`` and ``tcp://`` on a loopback address."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    return host_is_loopback(host)


def _check_endpoint(name: str, endpoint: str) -> None:
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"endpoints.{name}: {endpoint!r} must start with tcp://, ipc:// or inproc://")
    if endpoint.startswith("tcp://"):
        rest = endpoint[len("tcp://"):]
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not (port == "*" or port.isdigit()):
            raise ValueError(f"endpoints.{name}: {endpoint!r} must look like tcp://HOST:PORT")


@dataclass
class EndpointsConfig:
    """Where the daemon binds.

    Attributes:
        ingest: PULL socket for sensor frames.
        query: ROUTER socket for questions and control commands.
        events: PUB socket for events.
        metrics: ``host:port`` of the Prometheus text endpoint (loopback only; "" = off).
        ingest_hwm: ZeroMQ receive high-water mark of the ingest socket (messages).
        ingest_queue: context-policy samples held for the engine (oldest out); the frames
            themselves go straight into the frame buffer, so this never drops a frame.
    """

    ingest: str = "tcp://127.0.0.1:5555"
    query: str = "tcp://127.0.0.1:5556"
    events: str = "tcp://127.0.0.1:5557"
    metrics: str = "127.0.0.1:9464"
    ingest_hwm: int = 4
    ingest_queue: int = 8

    def __post_init__(self) -> None:
        for name in ("ingest", "query", "events"):
            _check_endpoint(name, getattr(self, name))
        if self.metrics:
            host, sep, port = self.metrics.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError(f"endpoints.metrics: {self.metrics!r} must be HOST:PORT or ''")
            if not host_is_loopback(host):
                raise ValueError(
                    f"endpoints.metrics: {self.metrics!r} must be on loopback (it has no auth); "
                    "use 127.0.0.1:PORT and scrape through a local agent"
                )
        if not 1 <= self.ingest_hwm <= 1000:
            raise ValueError(f"endpoints.ingest_hwm must be in 1..1000, got {self.ingest_hwm}")
        if not 1 <= self.ingest_queue <= 1000:
            raise ValueError(f"endpoints.ingest_queue must be in 1..1000, got {self.ingest_queue}")


@dataclass
class SecurityConfig:
    """CURVE authentication.

    Attributes:
        curve: encrypt and authenticate every socket.
        server_secret_key: the server's secret certificate (``zmq.auth.create_certificates``).
        client_keys_dir: directory of authorized clients' public certificates.
    """

    curve: bool = False
    server_secret_key: str = ""
    client_keys_dir: str = ""

    def __post_init__(self) -> None:
        if self.curve and not (self.server_secret_key and self.client_keys_dir):
            raise ValueError(
                "security.curve needs security.server_secret_key and security.client_keys_dir "
                "(create them with `mpnp daemon keygen DIR`)"
            )


@dataclass
class ModelConfig:
    """Which model backend owns the LLM: a registered name or ``module:factory``."""

    backend: str = "mpnp"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.backend:
            raise ValueError("model.backend must name a backend")
        if self.backend == "mpnp":  # the built-in backend's options are checked here, cheaply
            from daemon.mpnp_backend import MPnPBackendConfig

            try:
                MPnPBackendConfig(**self.options)
            except TypeError as exc:
                raise ValueError(f"model.options: {exc}") from exc


@dataclass
class StoreConfig:
    """The local store of encoders, aligners and adapted states."""

    path: str = ""
    memory_budget_mb: float = 4096.0
    keep_states: int = 5

    def __post_init__(self) -> None:
        if self.memory_budget_mb <= 0:
            raise ValueError(f"store.memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if self.keep_states < 1:
            raise ValueError(f"store.keep_states must be >= 1, got {self.keep_states}")

    @property
    def directory(self) -> Path:
        return Path(self.path).expanduser() if self.path else model_store_dir() / "store"


@dataclass
class PolicyConfig:
    name: str = "light-level"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            create_policy(self.name, **self.options)
        except TypeError as exc:
            raise ValueError(f"policy.options for {self.name!r}: {exc}") from exc
        except ValueError as exc:
            raise ValueError(f"policy: {exc}") from exc


@dataclass
class PowerConfig:
    """Power monitor: ``auto`` (jtop, then NVML, then CPU) or a name such as ``sim-orin``."""

    monitor: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    poll_interval_s: float = 1.0
    flops_per_s: float | None = None

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0:
            raise ValueError(f"power.poll_interval_s must be > 0, got {self.poll_interval_s}")
        if self.flops_per_s is not None and self.flops_per_s <= 0:
            raise ValueError(f"power.flops_per_s must be > 0, got {self.flops_per_s}")


#: ``adaptation.compose``: what the policy path does when a wanted modality set has no stored
#: state but the store holds one single-modality state per wanted modality.
COMPOSE_MODES = ("off", "serve", "finetune")
#: ``adaptation.compose_method``: ``auto`` is ``damc`` where the backend can search λ on
#: held-out questions, else ``naive`` (see :class:`AdaptationConfig`).
COMPOSE_METHODS = ("auto", "naive", "naive-ab", "damc")
#: ``adaptation.data``: which samples train an adaptation (see :class:`AdaptationConfig`).
DATA_SOURCES = ("world", "live", "live+world")


@dataclass
class AdaptationConfig:
    """When and how much to adapt (the planner settings are :class:`PlannerConfig`).

    Composition (training-free, :mod:`aligners.compose`): when the policy wants a set of two
    or more modalities with no stored state of its own, while the store holds a state for
    each of its modalities alone (camera and LiDAR states, say), the daemon can compose them
    at zero training FLOPs instead of adapting from scratch.

    Attributes:
        compose: ``off`` — never on the policy path (the ``compose`` command still works);
            ``serve`` — compose, validate on the held-out questions with the adaptation's
            gate (served only if strictly better than the serving state), and adapt as
            before when it cannot compose or the gate refuses; ``finetune`` — as ``serve``,
            then fine-tune from the composed state when the power budget allows a run.
        compose_method: ``naive`` (mean ΔW), ``naive-ab`` (mean of A and B), ``damc``
            (Σ λ_m ΔW_m, λ searched on held-out questions) or ``auto``: ``damc`` where the
            backend can search λ, else ``naive``. The search runs inside one engine step
            (questions wait for it), so it is bounded by ``compose_search_evals``
            evaluations of the backend's search subset (``mpnp``:
            ``model.options.compose_search_questions``).
        compose_search_evals: most λ candidates DAMC's search evaluates (>= 1).
        data: what an adaptation trains on: ``world`` — the offline stage's labelled
            splits of the context (the default; nothing live is used); ``live`` — the live
            sample buffer of the context (:mod:`daemon.samples`: object lists, taught pairs,
            pseudo-labels) once it holds ``min_samples``, validated on its newest frames;
            ``live+world`` — both for training, validated on the live held-out slice. With
            too few live samples the run falls back to the world's data (logged).
        min_samples: live samples a context needs before ``live`` / ``live+world`` use them.
        val_fraction: share of the buffered frames (the newest, by frame timestamp) held out
            for validation.
    """

    auto: bool = True
    initial_modalities: list[str] = field(default_factory=lambda: ["camera"])
    deadline_s: float = 600.0
    batch_size: int = 16
    target_steps: int = 300
    min_steps: int = 10
    n_min: int = 1
    n_max: int | None = None
    utilization: float = 0.8
    progress_every: int = 10
    compose: str = "finetune"
    compose_method: str = "auto"
    compose_search_evals: int = 4
    data: str = "world"
    min_samples: int = 32
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        modality_set(self.initial_modalities, "adaptation.initial_modalities")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"adaptation.data must be one of {DATA_SOURCES}, got {self.data!r}")
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) \
                or self.min_samples < 2:
            raise ValueError(f"adaptation.min_samples must be an integer >= 2, got "
                             f"{self.min_samples!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"adaptation.val_fraction must be in (0, 1), got "
                             f"{self.val_fraction!r}")
        if self.compose not in COMPOSE_MODES:
            raise ValueError(f"adaptation.compose must be one of {COMPOSE_MODES}, got "
                             f"{self.compose!r}")
        if self.compose_method not in COMPOSE_METHODS:
            raise ValueError(f"adaptation.compose_method must be one of {COMPOSE_METHODS}, got "
                             f"{self.compose_method!r}")
        if isinstance(self.compose_search_evals, bool) or not isinstance(
                self.compose_search_evals, int) or self.compose_search_evals < 1:
            raise ValueError(f"adaptation.compose_search_evals must be an integer >= 1, got "
                             f"{self.compose_search_evals!r}")
        if self.deadline_s <= 0:
            raise ValueError(f"adaptation.deadline_s must be > 0, got {self.deadline_s}")
        if self.progress_every < 1:
            raise ValueError(f"adaptation.progress_every must be >= 1, got {self.progress_every}")
        try:
            self.planner()
        except ValueError as exc:
            raise ValueError(f"adaptation: {exc}") from exc

    def planner(self) -> PlannerConfig:
        return PlannerConfig(
            batch_size=self.batch_size, target_steps=self.target_steps, min_steps=self.min_steps,
            n_min=self.n_min, n_max=self.n_max, utilization=self.utilization,
        )


@dataclass
class SamplesConfig:
    """The live sample buffer (:mod:`daemon.samples`; the ``teach``, ``objects`` and
    ``pseudo_label`` commands fill it, ``adaptation.data`` says whether adaptation uses it).

    Attributes:
        path: its directory (``""``: ``samples/`` next to the store's directory; not inside
            the store, whose recovery removes files it does not know).
        max_mb / max_samples: bounds per context; the oldest segments (one frame and the
            samples added with it) are evicted first.
        max_objects: objects one ``objects`` request may list.
        questions_per_frame: questions generated per frame by ``objects`` and
            ``pseudo_label`` when the request does not say (at most ``max_questions``).
        max_questions: most questions one request may generate or carry.
        seed: the answer balancer's and the question picker's random stream.
        pseudo_label_every_s: ``> 0``: every this many seconds, when no request waits and
            no adaptation runs, the serving state pseudo-labels the newest frame (once per
            frame; ``questions_per_frame`` questions) into ``pseudo_label_context`` — e.g.
            the camera state at dusk filling the night buffer for the LiDAR student.
            ``0`` (default): only the ``pseudo_label`` command does.
        pseudo_label_context: the context automatic pseudo-labels go to.
        pseudo_label_min_confidence: answers below this confidence are not stored.
    """

    path: str = ""
    max_mb: float = 512.0
    max_samples: int = 20000
    max_objects: int = 256
    questions_per_frame: int = 24
    max_questions: int = 64
    seed: int = 0
    pseudo_label_every_s: float = 0.0
    pseudo_label_context: str = "night"
    pseudo_label_min_confidence: float = 0.0

    def __post_init__(self) -> None:
        import re

        if self.pseudo_label_every_s < 0:
            raise ValueError("samples.pseudo_label_every_s must be >= 0 (0: off)")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", str(self.pseudo_label_context)):
            raise ValueError(f"samples.pseudo_label_context {self.pseudo_label_context!r} must "
                             "match [a-z0-9][a-z0-9_-]{0,31}")
        if not 0.0 <= self.pseudo_label_min_confidence <= 1.0:
            raise ValueError("samples.pseudo_label_min_confidence must be in 0..1")
        if self.max_mb <= 0:
            raise ValueError(f"samples.max_mb must be > 0, got {self.max_mb}")
        for name in ("max_samples", "max_objects", "questions_per_frame", "max_questions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"samples.{name} must be an integer >= 1, got {value!r}")
        if self.questions_per_frame > self.max_questions:
            raise ValueError("samples.questions_per_frame must be <= samples.max_questions")

    def directory(self, store_directory: Path) -> Path:
        return Path(self.path).expanduser() if self.path else store_directory.parent / "samples"


@dataclass
class LimitsConfig:
    """Bounds on what the wire may carry and on what one request may cost (PROTOCOL.md).

    Attributes:
        max_header_bytes / max_request_bytes: a sensor header / request body; the sockets'
            ZeroMQ ``MAXMSGSIZE`` cuts a single frame over twice the larger of the two (or
            over ``max_frame_bytes`` on ingest) before it is buffered (the peer is
            disconnected).
        max_question_chars / max_question_bytes: question length in characters / UTF-8 bytes.
        max_question_tokens: question length in the model's tokens (backends that count).
        max_pending_requests / max_pending_per_client: bounded request queue; over either,
            a request gets ``busy`` at once.
        max_queue_wait_s: a request that waited longer than this gets ``busy`` instead of
            being computed (its client has likely given up).
        clock_reset_frames: this many consecutive frames of one sensor older than its newest
            are a clock reset (or the newest was stamped in the future): the next is
            accepted and becomes the reference (counted); fewer are dropped as stale.
    """

    max_header_bytes: int = 16384
    max_frame_bytes: int = 64 * 1024 * 1024
    max_request_bytes: int = 65536
    max_question_chars: int = 2000
    max_question_bytes: int = 4096
    max_question_tokens: int = 256
    max_image_side: int = 4096
    max_lidar_points: int = 1_000_000
    max_batch: int = 16
    frame_history: int = 32
    max_pending_requests: int = 256
    max_pending_per_client: int = 64
    max_queue_wait_s: float = 30.0
    clock_reset_frames: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"limits.{f.name} must be a number, got {value!r}")
            minimum = 0.001 if f.type in (float, "float") else 1
            if value < minimum:
                raise ValueError(f"limits.{f.name} must be >= {minimum}, got {value}")


@dataclass
class DaemonConfig:
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    power: PowerConfig = field(default_factory=PowerConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    # [recording]: path = "" records nothing (recording.writer.RecordingSettings)
    recording: RecordingSettings = field(default_factory=RecordingSettings)
    log_format: str = "text"

    def __post_init__(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")
        if not self.security.curve:
            for name in ("ingest", "query", "events"):
                endpoint = getattr(self.endpoints, name)
                if not endpoint_is_local(endpoint):
                    raise ValueError(
                        f"endpoints.{name} = {endpoint!r} is not loopback/ipc and CURVE is off; "
                        "set security.curve = true with keys, or bind to 127.0.0.1 / ipc://"
                    )

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> DaemonConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: top level must be a table/object")
        kwargs: dict[str, Any] = {}
        sections = {f.name: f for f in fields(cls)}
        for key, value in data.items():
            if key not in sections:
                raise ValueError(f"{where}: unknown section {key!r}; known: {sorted(sections)}")
            if key == "log_format":
                kwargs[key] = value
                continue
            section_cls = _SECTION_TYPES[key]
            kwargs[key] = _build_section(section_cls, value, f"{where}: [{key}]")
        return cls(**kwargs)


def _build_section(section_cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table/object")
    known = {f.name for f in fields(section_cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    try:
        return section_cls(**value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


_SECTION_TYPES: dict[str, type] = {
    "endpoints": EndpointsConfig,
    "security": SecurityConfig,
    "model": ModelConfig,
    "store": StoreConfig,
    "policy": PolicyConfig,
    "power": PowerConfig,
    "adaptation": AdaptationConfig,
    "limits": LimitsConfig,
    "samples": SamplesConfig,
    "recording": RecordingSettings,
}


def load_config(path: str | os.PathLike[str]) -> DaemonConfig:
    """Load and validate a ``.toml`` or ``.json`` daemon config (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"daemon config {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from exc
    else:
        raise ValueError(f"{path}: daemon configs are .toml or .json")
    return DaemonConfig.from_dict(data, where=str(path))
