"""The one interface every frozen encoder implements: sensor frames -> tokens ``(B, T, D)``.

An encoder is split in two so that the network part can be exported (ONNX) and cached:

* :meth:`Encoder.preprocess` turns a batch of :class:`~scenes.sample.Frame` (numpy) into the
  model input tensor (no learned weights involved);
* :meth:`Encoder.forward` maps that tensor to ``T`` tokens of width ``D`` per frame.

On disk an encoder is a directory with ``encoder.safetensors`` (weights) and ``encoder.json``
(``{"type", "format_version", "kind", "config"}``); :func:`load_encoder` reads it back through
the registry in :mod:`encoders`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mpnp.files import atomic_write, atomic_write_text
from scenes.sample import Frame

log = logging.getLogger(__name__)

FORMAT_TYPE = "mpnp-encoder"
FORMAT_VERSION = 1
WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "encoder.json"
#: Modalities that no sensor provides (never served by the daemon); every other modality is
#: the name of the registered sensor its encoder reads (:mod:`scenes.sensors`).
DIAGNOSTIC_MODALITIES = ("oracle",)
#: Config fields of object slots (``encoders/slots.py``), left out of the fingerprint of an
#: encoder without slots.
SLOT_FIELDS = ("slots", "slot_layers")
FIX_HINT = "run `mpnp prepare` (or `mpnp encoders pretrain --kind {kind}`) to recreate it"


class EncoderFormatError(ValueError):
    """A saved encoder is corrupt, of an unknown format or does not fit its config."""


class Encoder(nn.Module, ABC):
    """Frozen unimodal encoder: frames -> tokens ``(B, T, D)``.

    Subclasses set :attr:`kind` (registry name), :attr:`sensor` (the registered sensor
    it reads, :mod:`scenes.sensors`; ``None`` for a diagnostic encoder that reads no sensor),
    :attr:`modality` (the sensor's name, or a diagnostic name) and :attr:`config_class` (a
    dataclass), and implement :meth:`preprocess`, :meth:`forward`, :meth:`example_input` and
    the two size properties. Pretraining and probes also use :meth:`region_layout` and
    :meth:`augment`.
    """

    kind: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    sensor: ClassVar[str | None] = None
    config_class: ClassVar[type]

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    # -- what a subclass provides ---------------------------------------------------------
    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """``T``: tokens per frame."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """``D``: width of every token."""

    @abstractmethod
    def preprocess(self, frames: Sequence[Frame]) -> torch.Tensor:
        """Numpy frames -> the float32 model input for :meth:`forward` (on the CPU)."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model input from :meth:`preprocess` -> tokens ``(B, T, D)``."""

    @abstractmethod
    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A zero input of the right shape (for export and benchmarks)."""

    # -- what pretraining and probes use (encoders/pretrain.py, encoders/probe.py) -----------
    def region_layout(self) -> tuple[str, int]:
        """How the tokens map to regions around the vehicle: ``("views", 6)`` (camera views)
        or ``("bands", k)`` (azimuth bands, :func:`encoders.targets.band_of`); tokens are
        region-major, so ``tokens.reshape(B, R, -1)`` gives each region's tokens."""
        raise NotImplementedError(f"encoder {self.kind!r} has no region layout (it cannot be "
                                  "pretrained on region targets)")

    @property
    def object_slots(self) -> int:
        """Object slots per region (``encoders/slots.py``): each of a region's tokens stands
        for one of its objects, nearest first; 0 (default): tokens summarise their region."""
        return 0

    def describe_tokens(self, frame: Frame) -> list[str | None]:
        """What each token of ``frame`` should carry, in words (``None``: nothing to say), from
        the frame's ground truth: the targets of text-anchored aligner pretraining
        (``aligners/anchoring.py``). The default describes each region's nearest objects
        (:func:`encoders.targets.region_descriptions`) for all of the region's tokens; an
        encoder with object slots describes each slot's own object
        (:func:`encoders.targets.slot_descriptions`)."""
        from encoders.targets import region_descriptions, slot_descriptions

        regions, count = self.region_layout()
        if self.object_slots:
            return slot_descriptions(frame, regions, count, self.object_slots)
        per_region = self.num_tokens // count
        return [text for text in region_descriptions(frame, regions, count)
                for _ in range(per_region)]

    def slot_targets(self, frames: Sequence[Frame]) -> np.ndarray:
        """What each object slot of ``frames`` should name, ``(B, R, K, fields)`` int64
        (:data:`encoders.targets.OBJECT_FIELDS`), from the frames' ground truth: the
        pretraining targets of an encoder with object slots. The default: slot k of a region
        stands for the region's k-th nearest object (:func:`encoders.targets.slot_targets`);
        an encoder whose tokens follow what it detects (``encoders/lidar_objects.py``) says
        which object each token shows instead."""
        from encoders.targets import slot_targets

        regions, count = self.region_layout()
        return slot_targets(frames, regions, count, self.object_slots)

    def augment(self, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A pretraining augmentation of a batch of inputs ``x`` and region targets ``y``
        ``(B, R, Q)`` that keeps them consistent; the default changes nothing."""
        return x, y

    # -- shared behaviour -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    def encode(self, frames: Sequence[Frame]) -> torch.Tensor:
        """Tokens ``(B, T, D)`` float32 for ``frames``: eval mode, no gradients, on
        the encoder's device."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                x = self.preprocess(frames).to(self.device)
                return self.forward(x).float()
        finally:
            self.train(was_training)

    def freeze(self) -> Encoder:
        """Eval mode and no parameter requires a gradient (what "frozen" means here)."""
        self.eval()
        for param in self.parameters():
            param.requires_grad_(False)
        return self

    def config_dict(self) -> dict:
        return asdict(self.config)

    def fingerprint(self) -> str:
        """sha256 over kind, config and every weight/buffer: any change gives a new value,
        which is what feature caches key on."""
        digest = hashlib.sha256()
        digest.update(self.kind.encode())
        config = self.config_dict()
        if not config.get("slots"):
            # Fields added with object slots do not count while slots are off, so encoders
            # saved before they existed keep their fingerprints (and the day states and
            # feature caches keyed on them stay valid).
            config = {k: v for k, v in config.items() if k not in SLOT_FIELDS}
        digest.update(json.dumps(config, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``encoder.safetensors`` + ``encoder.json`` to ``directory`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous().clone()
                   for k, v in self.state_dict().items()}
        header = {"type": FORMAT_TYPE, "format_version": FORMAT_VERSION, "kind": self.kind,
                  "modality": self.modality, "sensor": self.sensor,
                  "config": self.config_dict()}
        atomic_write(directory / WEIGHTS_FILE,
                     lambda p: save_file(tensors, str(p), metadata={"kind": self.kind}))
        atomic_write_text(directory / CONFIG_FILE, json.dumps(header, indent=1))
        return directory

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, tokens={self.num_tokens}, dim={self.dim}"


def init_from_generator(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Initialise every parameter and buffer of ``module`` from ``generator`` alone, in a
    fixed order (ViT-style: weights truncated normal std 0.02, biases 0, 1-D weights 1,
    batch-norm statistics reset). With a module built on the ``meta`` device and then
    materialised (``to_empty``), creating an encoder neither reseeds nor advances the
    process's global random stream: nothing in a serving process touches it."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._NormBase):
                sub.reset_running_stats()
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                nn.init.trunc_normal_(param, std=0.02, generator=generator)
    return module


def read_encoder_header(directory: str | os.PathLike[str]) -> dict:
    """Read and check ``encoder.json`` of a saved encoder; errors name the path and the fix."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"encoder config {path} is missing; "
                                + FIX_HINT.format(kind="KIND"))
    try:
        header = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderFormatError(f"encoder config {path} is not valid JSON ({exc}); "
                                 + FIX_HINT.format(kind="KIND")) from exc
    if not isinstance(header, dict) or header.get("type") != FORMAT_TYPE:
        raise EncoderFormatError(f"{path} is not an {FORMAT_TYPE} config (type "
                                 f"{header.get('type') if isinstance(header, dict) else None!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise EncoderFormatError(f"{path}: format_version {header.get('format_version')!r} is "
                                 f"not supported (expected {FORMAT_VERSION}); "
                                 + FIX_HINT.format(kind=header.get("kind", "KIND")))
    if not isinstance(header.get("kind"), str) or not isinstance(header.get("config"), dict):
        raise EncoderFormatError(f"{path}: needs a string 'kind' and an object 'config'")
    return header


def load_encoder(directory: str | os.PathLike[str], device: str | torch.device = "cpu",
                 frozen: bool = True) -> Encoder:
    """Load an encoder written by :meth:`Encoder.save` (frozen and in eval mode by default)."""
    from encoders import create_encoder

    directory = Path(directory)
    header = read_encoder_header(directory)
    kind = header["kind"]
    hint = FIX_HINT.format(kind=kind)
    try:
        encoder = create_encoder(kind, **header["config"])
    except (TypeError, ValueError) as exc:
        raise EncoderFormatError(f"{directory / CONFIG_FILE}: config does not fit encoder "
                                 f"{kind!r} ({exc}); {hint}") from exc
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"encoder weights {weights} are missing; {hint}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise EncoderFormatError(f"encoder weights {weights} are corrupt ({exc}); {hint}") from exc
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise EncoderFormatError(f"encoder weights {weights} do not match its config: missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes "
                                 f"{wrong[:5]}; {hint}")
    encoder.load_state_dict(state, strict=True)
    encoder.to(device)
    return encoder.freeze() if frozen else encoder


def check_frames(frames: Sequence[Frame], what: str) -> None:
    """Raise ``ValueError`` for an empty batch or a malformed frame (naming it)."""
    if isinstance(frames, Frame):
        raise ValueError(f"{what}: expected a sequence of frames, got a single Frame "
                         "(wrap it in a list)")
    if len(frames) == 0:
        raise ValueError(f"{what}: got an empty batch of frames")
    for frame in frames:
        if not isinstance(frame, Frame):
            raise ValueError(f"{what}: expected Frame objects, got {type(frame).__name__}")
        frame.validate()
