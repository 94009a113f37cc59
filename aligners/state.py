"""Save and load an adapted state: safetensors + a JSON config naming its type and version.

A state directory holds ``state.safetensors`` (every tensor of the state by a stable name:
aligners and positional embeddings, connection weights, LoRA of the connected blocks) and
``state.json`` (type, format version, modalities and which are connected, N, the connection
config, the identity of the LLM it was made for, and the sha256 of the tensor file). Both are
written atomically; loading checks the checksum, the LLM identity and the exact tensor set,
so a state is never half-loaded or loaded onto the wrong model.

Outside a model a state is a :class:`StateData` (config + tensors): :func:`read_state`,
:func:`write_state`, :func:`snapshot_state` (from a model) and :func:`install_state` (into one).
A store that keeps one file per entry (the daemon's) holds the same state as one safetensors
file whose header carries the ``state.json`` fields (:func:`write_state_file` /
:func:`read_state_file`). The trainer's checkpoints are state directories too.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from aligners.config import ConnectionConfig, ModalitySpec
from aligners.model import MPnPModel
from mpnp.files import atomic_write, atomic_write_bytes, sha256_file
from mpnp.llm import llm_fingerprint, llm_mismatch

log = logging.getLogger(__name__)

STATE_TYPE = "mpnp.adapted_state"
FORMAT_VERSION = 1
TENSORS_FILE = "state.safetensors"
CONFIG_FILE = "state.json"


class StateError(ValueError):
    """A state that cannot be loaded: corrupt, of another format, or for another LLM."""


def save_state(
    model: MPnPModel, directory: str | os.PathLike[str], name: str | None = None
) -> Path:
    """Save state ``name`` (default: the active one) into ``directory``.

    The tensor file is written first and the JSON (which carries its checksum) last, so a
    crash in between leaves the previous complete state or a detectably incomplete one.
    """
    return write_state(snapshot_state(model, name, copy=False), directory)


@dataclass
class StateData:
    """A state outside any model: its ``state.json`` fields and its tensors by saved name.

    What :func:`save_state` writes and :func:`load_state` reads, as a value: states can be
    inspected or combined (:mod:`aligners.compose`) without a resident LLM, then written
    with :func:`write_state` or put into a model with :func:`install_state`.
    ``config`` holds ``name``, ``num_blocks``, ``connection``, ``modalities``,
    ``connected`` and ``llm`` (the fingerprint of the LLM it was made for), and may hold
    provenance such as ``composition``.
    """

    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return str(self.config.get("name", "state"))

    @property
    def num_blocks(self) -> int:
        return int(self.config["num_blocks"])

    @property
    def connection(self) -> ConnectionConfig:
        return ConnectionConfig.from_dict(self.config["connection"])

    @property
    def modalities(self) -> list[ModalitySpec]:
        return [ModalitySpec(**m) for m in self.config["modalities"]]

    @property
    def connected(self) -> list[str]:
        return list(self.config["connected"])


def snapshot_state(model: MPnPModel, name: str | None = None, *, copy: bool = True) -> StateData:
    """State ``name`` (default: the active one) of ``model`` as a :class:`StateData` on the CPU.

    ``copy=False`` may share memory with the live parameters (on a CPU model): only for
    writing it out at once.
    """
    state = model.states[name] if name else model._require_state()
    tensors = {}
    for key, value in model.state_tensors(state.name).items():
        value = value.detach().to("cpu").contiguous()
        tensors[key] = value.clone() if copy else value
    config = {
        "name": state.name,
        "num_blocks": state.config.num_blocks,
        "connection": state.config.to_dict(),
        "modalities": [asdict(s) for s in state.modalities],
        "connected": list(state.connected),
        "llm": llm_fingerprint(model.llm),
    }
    return StateData(config, tensors)


def write_state(data: StateData, directory: str | os.PathLike[str]) -> Path:
    """Write ``data`` into ``directory`` as :func:`save_state` does (tensors first, JSON last)."""
    out = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in data.tensors.items()}
    digest, _ = atomic_write(out / TENSORS_FILE, lambda tmp: save_file(
        tensors, str(tmp), metadata={"type": STATE_TYPE, "format_version": str(FORMAT_VERSION)}))
    config = {"type": STATE_TYPE, "format_version": FORMAT_VERSION, **data.config,
              "tensors_sha256": digest}
    atomic_write_bytes(out / CONFIG_FILE, json.dumps(config, indent=2).encode())
    log.info("saved state %r (%d tensors) to %s", data.name, len(tensors), out)
    return out


def write_state_file(data: StateData, path: str | os.PathLike[str]) -> None:
    """Write ``data`` as one file: the tensors, with what ``state.json`` holds (type,
    version, config) in the safetensors header. For stores that keep one file per entry
    (the daemon's :class:`~daemon.store.ModelStore`, which checksums it in its manifest).
    Not atomic by itself: the caller's writer is (``ModelStore.put``)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in data.tensors.items()}
    save_file(tensors, str(path), metadata={"type": STATE_TYPE,
                                            "format_version": str(FORMAT_VERSION),
                                            "config": json.dumps(data.config)})


def read_state_file(path: str | os.PathLike[str]) -> StateData:
    """Read a state written by :func:`write_state_file` (type and version checked)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("type") != STATE_TYPE:
                raise StateError(f"{path}: type {meta.get('type')!r} is not {STATE_TYPE!r}")
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise StateError(f"{path}: format version {meta.get('format_version')} is not "
                                 f"supported (this mpnp reads version {FORMAT_VERSION})")
            config = json.loads(meta["config"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as exc:
        raise StateError(f"{path} is not a readable state file ({exc})") from exc
    return StateData(config, tensors)


def read_state_config(directory: str | os.PathLike[str]) -> dict:
    """Read and validate ``state.json`` (type, version); raise :class:`StateError` clearly."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise StateError(f"no adapted state at {directory}: {path} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateError(f"{path} is corrupt ({exc}); restore it or delete the state") from exc
    if config.get("type") != STATE_TYPE:
        raise StateError(f"{path}: type {config.get('type')!r} is not {STATE_TYPE!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise StateError(
            f"{path}: format version {config.get('format_version')} is not supported "
            f"(this mpnp reads version {FORMAT_VERSION})"
        )
    return config


def read_state(directory: str | os.PathLike[str]) -> StateData:
    """Read a saved state without a model: config validated, tensors checked against their
    checksum. (Which LLM it fits is checked when it is installed, :func:`install_state`.)"""
    directory = Path(directory)
    config = read_state_config(directory)
    tensor_path = directory / TENSORS_FILE
    if not tensor_path.is_file():
        raise StateError(f"{tensor_path} is missing")
    if sha256_file(tensor_path) != config.get("tensors_sha256"):
        raise StateError(f"{tensor_path} does not match its checksum in {CONFIG_FILE}: corrupt")
    for key in ("type", "format_version", "tensors_sha256"):
        config.pop(key, None)
    return StateData(config, load_file(str(tensor_path)))


def load_state(
    model: MPnPModel,
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    num_blocks: int | None = None,
    activate: bool = True,
) -> str:
    """Load a saved state into ``model`` as a new state and (by default) activate it.

    Args:
        model: the resident model.
        directory: a directory written by :func:`save_state` (or a file written by
            :func:`write_state_file`).
        name: the name to load it under (default: its saved name).
        num_blocks: if given, the N the caller expects; a state saved with another N is
            refused rather than silently changing the model's N.
        activate: make it the active state.

    Returns:
        The state's name in ``model.states``.

    Raises:
        StateError: corrupt files, another LLM, another N, or a tensor set that does not match.
    """
    data = read_state_file(directory) if Path(directory).is_file() else read_state(directory)
    state_name = install_state(model, data, name=name, num_blocks=num_blocks,
                               activate=activate, source=str(directory))
    log.info("loaded state %r from %s", state_name, directory)
    return state_name


def install_state(
    model: MPnPModel,
    data: StateData,
    *,
    name: str | None = None,
    num_blocks: int | None = None,
    activate: bool = True,
    source: str | None = None,
) -> str:
    """Put ``data`` into ``model`` as a new state (see :func:`load_state` for the arguments).

    Refuses a state made for another LLM, another N than ``num_blocks`` (if given), or a
    tensor set that does not fit its own config; nothing is half-installed.
    """
    where = f"state in {source}" if source else f"state {data.name!r}"
    config = data.config
    mine = llm_fingerprint(model.llm)
    theirs = config.get("llm", {})
    diff = llm_mismatch(mine, theirs)
    if diff:
        detail = ", ".join(
            f"{k}: saved {theirs.get(k)!r} vs loaded {mine.get(k)!r}"
            if k != "embedding_probe" else
            f"embedding weights ({theirs.get('dtype', 'float32')} saved, {mine['dtype']} "
            "loaded) differ beyond rounding"
            for k in diff
        )
        raise StateError(f"{where} was made for another LLM ({detail})")
    if num_blocks is not None and config["num_blocks"] != num_blocks:
        raise StateError(
            f"{where} connects N={config['num_blocks']} blocks, expected N={num_blocks}"
        )
    conn = ConnectionConfig.from_dict(config["connection"])
    specs = [ModalitySpec(**m) for m in config["modalities"]]
    state_name = name or config["name"]
    tensors = data.tensors
    model.create_state(state_name, specs, conn, connect=False, activate=False)
    try:
        expected = model.state_tensors(state_name)
        missing, unexpected = (
            sorted(set(expected) - set(tensors)),
            sorted(set(tensors) - set(expected)),
        )
        if missing or unexpected:
            raise StateError(
                f"{where} does not fit its own config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for key, param in expected.items():
                if param.shape != tensors[key].shape:
                    raise StateError(
                        f"{key}: saved shape {tuple(tensors[key].shape)} "
                        f"!= expected {tuple(param.shape)}"
                    )
                param.copy_(tensors[key])
        unknown = [m for m in config["connected"] if m not in {s.name for s in specs}]
        if unknown:
            raise StateError(f"connected modalities {unknown} have no aligners")
        model.states[state_name].connected = list(config["connected"])
    except Exception:
        model.remove_state(state_name)
        raise
    if activate:
        model.activate(state_name)
    return state_name
