"""The daemon's frozen encoders: stored in the model store, loaded on demand, and the tokens
of recent live frames kept so that several questions about one frame encode it once.

Until a store is attached the offline stage's in-memory encoders serve; :meth:`attach_store`
imports them into the store (one safetensors file each, its config and fingerprint in the
manifest) and from then on an encoder is in memory only while the store's LRU budget keeps it
(a LiDAR encoder is loaded when LiDAR is connected, Algorithm 1's Reconnect, and may be
evicted again).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aligners.config import ModalitySpec
from daemon.store import EntryKind, ModelStore, StoreError
from scenes.sample import Frame

log = logging.getLogger(__name__)


def encoder_spec(encoder) -> ModalitySpec:
    """What the aligners need to know about an encoder's tokens."""
    return ModalitySpec(encoder.modality, embed_dim=encoder.dim, num_tokens=encoder.num_tokens)


def load_encoder_file(path: Path, meta: dict[str, Any], device: str):
    """Rebuild a frozen encoder from a store entry (weights file + header in the manifest)."""
    from safetensors.torch import load_file

    from encoders import create_encoder

    encoder = create_encoder(meta["kind"], **meta["config"])
    encoder.load_state_dict(load_file(str(path)), strict=True)
    encoder.to(device)
    if encoder.fingerprint() != meta["fingerprint"]:
        raise StoreError(f"{path}: encoder weights do not match their fingerprint")
    return encoder.freeze()


class EncoderPool:
    """Encoders by modality (store-backed once attached) and an LRU cache of frame tokens.

    Args:
        encoders: the offline stage's encoders by modality.
        device: where loaded encoders live.
        frame_cache: encoded live frames kept (per modality and frame id).
    """

    def __init__(self, encoders: Mapping[str, Any], device: str = "cpu",
                 frame_cache: int = 16) -> None:
        self._initial = dict(encoders)
        self._local = dict(encoders)  # used until a store is attached
        self.specs = {m: encoder_spec(e) for m, e in encoders.items()}
        self.device = device
        self.frame_cache = frame_cache
        self.store: ModelStore | None = None
        self._frames: OrderedDict[tuple[str, str], Any] = OrderedDict()

    @property
    def modalities(self) -> list[str]:
        return sorted(self.specs)

    def attach_store(self, store: ModelStore, load: Sequence[str] = ()) -> None:
        """Import the encoders into ``store`` (skipped where the same fingerprint is there)
        and load ``load`` (the serving modalities) through it."""
        from safetensors.torch import save_file

        self.store = store
        for modality, encoder in self._initial.items():
            name = f"encoder-{modality}"
            fingerprint = encoder.fingerprint()
            try:
                if store.get(name).meta.get("fingerprint") == fingerprint:
                    continue
            except StoreError:
                pass
            header = {"kind": encoder.kind, "modality": modality,
                      "config": encoder.config_dict(), "fingerprint": fingerprint}
            tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
            store.put(name, EntryKind.ENCODER, lambda p, t=tensors: save_file(t, str(p)), header)
        self._local = {}  # drop the preparation copies: the store owns them now
        self._initial = {}
        for modality in load:
            self.encoder(modality)

    def encoder(self, modality: str):
        """The frozen encoder of ``modality``, loaded on demand."""
        if modality not in self.specs:
            raise ValueError(f"no encoder for modality {modality!r}; have {self.modalities}")
        if self.store is None:
            return self._local[modality]
        entry = self.store.get(f"encoder-{modality}")
        return self.store.load(entry.name, lambda path: load_encoder_file(path, entry.meta,
                                                                          self.device))

    def spec(self, modality: str, *, load: bool = True) -> ModalitySpec:
        """``modality``'s spec; with ``load`` its encoder is loaded now (Reconnect)."""
        if load:
            self.encoder(modality)
        elif modality not in self.specs:
            raise ValueError(f"no encoder for modality {modality!r}; have {self.modalities}")
        return self.specs[modality]

    def tokens(self, frames: Sequence[Frame], modalities: Sequence[str]) -> dict[str, Any]:
        """Tokens ``(B, T, D)`` per modality of ``frames`` (cached per frame id)."""
        import torch

        out = {}
        for modality in modalities:
            rows = []
            for frame in frames:
                key = (modality, frame.frame_id)
                if key not in self._frames:
                    self._frames[key] = self.encoder(modality).encode([frame])[0]
                    while len(self._frames) > self.frame_cache:
                        self._frames.popitem(last=False)
                self._frames.move_to_end(key)
                rows.append(self._frames[key])
            out[modality] = torch.stack(rows)
        return out

    def clear_tokens(self) -> None:
        self._frames.clear()
