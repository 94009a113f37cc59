"""The resident LLM with elastic mPnP connections (README: How the connection works).

:class:`MPnPModel` wraps a loaded causal LM without copying or forking it. It keeps any
number of :class:`AdaptedState` s (aligners + latent connections + LoRA on K/V), one of which
is active. Connecting or disconnecting a modality, changing N, or swapping states are cheap
operations on the resident model — the LLM is never reloaded.

With no state active, or an active state with nothing connected (or N = 0), the model is
the base LLM exactly: no extra keys anywhere and every LoRA disabled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from aligners.config import ConnectionConfig, ModalitySpec
from aligners.connections import LatentConnections
from aligners.injection import BlockPrefix, attach_injector
from aligners.kv_aligner import ModalityAligner, Projection
from aligners.lora import KVLoRA
from mpnp.llm import LLMGeometry, attention_input_norms, attention_modules, llm_geometry

log = logging.getLogger(__name__)

#: Optimizer parameter groups, in the order the trainer builds them.
PARAM_GROUPS = ("aligners", "connections", "lora")


class AdaptedState(nn.Module):
    """What Adapt trains for one modality set: aligners and latent connections.

    The state's LoRA tensors live inside the LLM's projections under the adapter named
    ``self.name`` (see :class:`aligners.lora.KVLoRA`); :class:`MPnPModel` reaches them.
    """

    def __init__(self, name: str, config: ConnectionConfig, geometry: LLMGeometry):
        super().__init__()
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"state name must be alphanumeric/underscore/dash, got {name!r}")
        if config.num_blocks > geometry.num_layers:
            raise ValueError(
                f"num_blocks {config.num_blocks} > the LLM's {geometry.num_layers} blocks"
            )
        self.name = name
        self.config = config
        self.geometry = geometry
        self.aligners = nn.ModuleDict()
        self.connections = LatentConnections(
            geometry.num_layers, config.temperature, trainable=config.train_connections,
            init_alpha=config.init_alpha,
        )
        self.connected: list[str] = []

    @property
    def modalities(self) -> list[ModalitySpec]:
        return [a.spec for a in self.aligners.values()]

    def add_modality(self, spec: ModalitySpec) -> None:
        if spec.name in self.aligners:
            raise ValueError(f"state {self.name!r} already has modality {spec.name!r}")
        self.aligners[spec.name] = ModalityAligner(spec, self.geometry, self.config)

    def connected_layers(self) -> range:
        """The blocks that take multimodal K/V: the last N, or none when nothing is connected."""
        if not self.connected or self.config.num_blocks == 0:
            return range(0)
        return range(self.geometry.num_layers - self.config.num_blocks, self.geometry.num_layers)


class MultimodalKV:
    """The connected modalities' aligned tokens for one batch (:meth:`MPnPModel.multimodal_kv`).

    Computed once per query and reused by every connected block and decoding step;
    :meth:`block` gives the keys/values one block attends to (before its gate), computed the
    first time that block asks (paper aligners: the same tensors for every block).
    """

    def __init__(self, parts: list[tuple[ModalityAligner, torch.Tensor, torch.Tensor]],
                 project: Callable[[int], Projection | None]):
        self._parts = parts
        self._project = project
        self._blocks: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}

    def block(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``K_mm, V_mm`` of block ``layer``, each ``(B, n_kv, P, head_dim)``."""
        key = layer if any(a.per_block for a, _, _ in self._parts) else None
        if key not in self._blocks:
            project = self._project(layer)
            ks, vs = zip(*(a.block_kv(layer, k, v, project) for a, k, v in self._parts))
            self._blocks[key] = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
        return self._blocks[key]


class MPnPModel(nn.Module):
    """A resident decoder-only LLM whose last N blocks take modality keys/values."""

    def __init__(self, llm: nn.Module, tokenizer=None):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.geometry = llm_geometry(llm)
        self._attention = attention_modules(llm)
        self._norms = attention_input_norms(llm)
        self._injector = attach_injector(llm, self._attention)
        self._lora = KVLoRA(self._attention)
        self.states = nn.ModuleDict()
        self.active_name: str | None = None
        llm.requires_grad_(False)
        self.eval()

    @property
    def attention_modules(self) -> list[nn.Module]:
        """The LLM's attention module of every block (:func:`mpnp.llm.attention_modules`)."""
        return list(self._attention)

    # ------------------------------------------------------------------ states

    @property
    def state(self) -> AdaptedState | None:
        """The active state, or ``None`` (the base LLM)."""
        return None if self.active_name is None else self.states[self.active_name]

    def _require_state(self) -> AdaptedState:
        if self.state is None:
            raise RuntimeError("no adapted state is active; create_state() or activate() first")
        return self.state

    def create_state(
        self,
        name: str,
        modalities: Sequence[ModalitySpec],
        config: ConnectionConfig | None = None,
        *,
        connect: bool = True,
        activate: bool = True,
    ) -> AdaptedState:
        """Create a new state with fresh aligners for ``modalities`` (connected by default)."""
        if name in self.states:
            raise ValueError(f"state {name!r} exists; remove_state() it first")
        state = AdaptedState(name, config or ConnectionConfig(), self.geometry)
        state.to(self._device()).train(self.training)
        for spec in modalities:
            state.add_modality(spec)
        self.states[name] = state
        if connect:
            state.connected = [s.name for s in modalities]
        self._sync_lora(state)
        if activate:
            self.activate(name)
        return state

    @torch.no_grad()
    def clone_state(self, source: str, name: str, *, activate: bool = True) -> AdaptedState:
        """Copy state ``source`` (aligners, connections, LoRA, connected set) as ``name``.

        Runtime Adapt trains the copy while ``source`` keeps serving untouched.
        """
        if source not in self.states:
            raise KeyError(f"unknown state {source!r}; have {sorted(self.states)}")
        src = self.states[source]
        state = self.create_state(name, src.modalities, dataclasses.replace(src.config),
                                  connect=False, activate=False)
        theirs = self.state_tensors(source)
        for key, tensor in self.state_tensors(name).items():
            tensor.copy_(theirs[key])
        state.connected = list(src.connected)
        if activate:
            self.activate(name)
        return state

    def activate(self, name: str | None) -> None:
        """Serve with state ``name`` (``None``: the base LLM). Nothing is reloaded."""
        if name is not None and name not in self.states:
            raise KeyError(f"unknown state {name!r}; have {sorted(self.states)}")
        self.active_name = name
        self._refresh_lora()

    def remove_state(self, name: str) -> None:
        if name not in self.states:
            raise KeyError(f"unknown state {name!r}")
        if self.active_name == name:
            self.activate(None)
        self._lora.delete(name)
        del self.states[name]
        self._refresh_lora()

    # ------------------------------------------------------------------ elastic knobs

    def add_modality(self, spec: ModalitySpec, *, connect: bool = True) -> None:
        """Give the active state a new modality with fresh aligners (to be trained)."""
        state = self._require_state()
        state.add_modality(spec)
        state.aligners[spec.name].to(self._device()).train(self.training)
        if connect:
            self.connect(spec.name)

    def copy_aligners(self, source: str, *names: str) -> None:
        """Give the active state the aligners (and positional embeddings) of modalities
        ``names`` from the resident state ``source`` — pretrained aligners that already
        speak this LLM's keys/values (Algorithm 1's offline stage prepares them for every
        modality). The active state must already have those modalities with the same
        token shape; their connection status is unchanged."""
        state = self._require_state()
        if source not in self.states:
            raise KeyError(f"no resident state {source!r} (have {sorted(self.states)})")
        donor = self.states[source]
        for field in ("aligner_space", "block_maps"):
            if getattr(donor.config, field) != getattr(state.config, field):
                raise ValueError(f"state {source!r} has {field}={getattr(donor.config, field)!r}, "
                                 f"{state.name!r} {getattr(state.config, field)!r}: its "
                                 "aligners do not fit this state")
        for name in names:
            if name not in donor.aligners:
                raise KeyError(f"state {source!r} has no aligners for {name!r}")
            if name not in state.aligners:
                raise KeyError(f"state {state.name!r} has no aligners for {name!r}; "
                               "add_modality() first")
            if donor.aligners[name].spec != state.aligners[name].spec:
                raise ValueError(f"{name}: aligners of {source!r} are for "
                                 f"{donor.aligners[name].spec}, this state has "
                                 f"{state.aligners[name].spec}")
            with torch.no_grad():
                theirs = donor.aligners[name].state_dict()
                state.aligners[name].load_state_dict(theirs, strict=True)

    def connect(self, *names: str) -> None:
        state = self._require_state()
        for name in names:
            if name not in state.aligners:
                raise KeyError(f"state {state.name!r} has no aligners for {name!r}; add_modality()")
            if name not in state.connected:
                state.connected.append(name)
        self._refresh_lora()

    def disconnect(self, *names: str) -> None:
        state = self._require_state()
        for name in names:
            if name not in state.connected:
                raise KeyError(f"{name!r} is not connected (connected: {state.connected})")
            state.connected.remove(name)
        self._refresh_lora()

    def set_num_blocks(self, num_blocks: int) -> None:
        """Change N of the active state; LoRA of blocks that stay connected is kept."""
        state = self._require_state()
        if not 0 <= num_blocks <= self.geometry.num_layers:
            raise ValueError(f"num_blocks must be in [0, {self.geometry.num_layers}]")
        state.config.num_blocks = num_blocks
        self._sync_lora(state)
        self._refresh_lora()

    def _sync_lora(self, state: AdaptedState) -> None:
        if state.config.lora:
            last = range(
                self.geometry.num_layers - state.config.num_blocks, self.geometry.num_layers
            )
            self._lora.ensure(state.name, last, state.config)
            self.llm.train(self.training)  # new LoRA layers follow the model's mode

    def _refresh_lora(self) -> None:
        state = self.state
        live = state is not None and state.config.lora and len(state.connected_layers()) > 0
        self._lora.activate(state.name if live else None)

    # ------------------------------------------------------------------ forward

    def _device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def multimodal_kv(self, modality_tokens: Mapping[str, torch.Tensor]) -> MultimodalKV | None:
        """The connected modalities' aligned tokens (:class:`MultimodalKV`), computed once per
        query and reused by every connected block and decoding step. ``None`` when nothing
        is connected."""
        state = self.state
        if state is None or not state.connected_layers():
            return None
        missing = [m for m in state.connected if m not in modality_tokens]
        if missing:
            raise ValueError(f"tokens missing for connected modalities {missing}")
        parts = [(state.aligners[m], *state.aligners[m](modality_tokens[m]))
                 for m in state.connected]
        return MultimodalKV(parts, self.block_projection)

    def block_projection(self, layer: int) -> Projection:
        """Block ``layer``'s frozen ``(u_k, u_v) -> (k_proj(norm(u_k)), v_proj(norm(u_v)))``
        for hidden-space aligners: the base projections, never a state's LoRA, so LoRA acts
        on text tokens only (README: How the connection works)."""
        norm = self._norms[layer]
        attn = self._attention[layer]
        k_proj, v_proj = (getattr(p, "base_layer", p) for p in (attn.k_proj, attn.v_proj))

        def project(u_k: torch.Tensor, u_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return k_proj(norm(u_k)), v_proj(norm(u_v))

        return project

    @contextmanager
    def prefix(self, kv: MultimodalKV | None) -> Iterator[None]:
        """Inject ``kv`` (from :meth:`multimodal_kv`) into the connected blocks meanwhile."""
        if kv is None:
            yield
            return
        state = self._require_state()
        layers = set(state.connected_layers())
        connections = state.connections
        logit_gate = state.config.gate == "logit"

        def provide(layer_idx: int) -> BlockPrefix | None:
            if layer_idx not in layers:
                return None
            k_mm, v_mm = kv.block(layer_idx)
            if logit_gate:
                w = connections.weight[layer_idx] / connections.temperature
                return BlockPrefix(k_mm, v_mm, F.logsigmoid(w))
            alpha = connections.alpha(layer_idx)
            return BlockPrefix(alpha * k_mm, alpha * v_mm)

        with self._injector.active(provide):
            yield

    def isolating(self, provider) -> contextlib.AbstractContextManager[None]:
        """Isolate text spans in chosen blocks meanwhile (a diagnostic; see
        :meth:`aligners.injection.KVInjector.isolating`)."""
        return self._injector.isolating(provider)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        modality_tokens: Mapping[str, torch.Tensor] | None = None,
        *,
        kv: MultimodalKV | None = None,
        **llm_kwargs,
    ):
        """Run the LLM on text with the active state's modalities injected.

        Give either ``modality_tokens`` (encoder outputs by modality) or a precomputed ``kv``.
        Other keyword arguments (``labels``, ``cache``, ``position_ids``, ``logits_to_keep``
        ...) go to the LLM unchanged.
        """
        if kv is None and modality_tokens is not None:
            kv = self.multimodal_kv(modality_tokens)
        elif kv is None and self.state is not None and self.state.connected_layers():
            raise ValueError(f"modalities {self.state.connected} are connected: pass their tokens")
        ctx = self.prefix(kv) if kv is not None else nullcontext()
        with ctx:
            return self.llm(input_ids=input_ids, attention_mask=attention_mask, **llm_kwargs)

    # ------------------------------------------------------------------ training

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """The active state's trainable tensors by group and stable name."""
        state = self._require_state()
        groups: dict[str, dict[str, nn.Parameter]] = {g: {} for g in PARAM_GROUPS}
        for name, p in state.aligners.named_parameters():
            groups["aligners"][f"aligners.{name}"] = p
        if state.config.train_connections:
            groups["connections"]["connections.weight"] = state.connections.weight
        if state.config.lora:
            for name, p in self._lora.parameters(state.name).items():
                groups["lora"][f"lora.{name}"] = p
        return groups

    def state_tensors(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """Every tensor of a state (trainable or not) by the name it is saved under."""
        state = self.states[name] if name else self._require_state()
        tensors = {f"aligners.{k}": v for k, v in state.aligners.named_parameters()}
        tensors["connections.weight"] = state.connections.weight
        if state.config.lora:
            tensors.update({f"lora.{k}": v for k, v in self._lora.parameters(state.name).items()})
        return tensors

    def set_trainable(self) -> list[str]:
        """Freeze everything but the active state's parameter groups; return their names."""
        self.requires_grad_(False)
        names = []
        for group in self.parameter_groups().values():
            for name, p in group.items():
                p.requires_grad_(True)
                names.append(name)
        return names
