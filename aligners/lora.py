"""LoRA on ``k_proj``/``v_proj`` of the connected blocks only, one peft adapter per state.

We use peft's LoRA layer directly instead of wrapping the whole LLM in a ``PeftModel``:
the set of connected blocks changes at runtime (elastic N) and several adapted states are
kept side by side (one named adapter each), so adapters are added to and removed from
individual projections as N changes. A projection is wrapped the first time any state needs
it and stays wrapped; with no adapter active it computes exactly ``base_layer(x)``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from aligners.config import ConnectionConfig

log = logging.getLogger(__name__)

PROJECTIONS = ("k_proj", "v_proj")


class KVLoRA:
    """The LoRA adapters of all states on one LLM's key/value projections."""

    def __init__(self, attention: list[nn.Module]):
        self._attention = attention
        self._configs: dict[str, LoraConfig] = {}

    def _proj(self, layer: int, name: str) -> nn.Module:
        return getattr(self._attention[layer], name)

    def adapter_layers(self, adapter: str) -> list[int]:
        """Blocks whose projections carry ``adapter``."""
        return [
            i
            for i in range(len(self._attention))
            if isinstance(p := self._proj(i, "k_proj"), LoraLinear) and adapter in p.lora_A
        ]

    def ensure(self, adapter: str, layers: Iterable[int], config: ConnectionConfig) -> None:
        """Give exactly ``layers`` an adapter named ``adapter`` (new ones start at ΔW = 0).

        Blocks that keep the adapter keep their trained weights; blocks leaving the set lose
        theirs (N shrank); blocks joining get a fresh zero-initialised adapter (N grew).
        """
        wanted = set(layers)
        lora_cfg = self._configs.setdefault(
            adapter,
            LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=list(PROJECTIONS),
            ),
        )
        for i in range(len(self._attention)):
            for name in PROJECTIONS:
                proj = self._proj(i, name)
                has = isinstance(proj, LoraLinear) and adapter in proj.lora_A
                if i in wanted and not has:
                    if isinstance(proj, LoraLinear):
                        proj.update_layer(adapter, lora_cfg.r, lora_cfg.lora_alpha, config=lora_cfg)
                    else:
                        wrapped = LoraLinear(
                            proj,
                            adapter,
                            config=lora_cfg,
                            r=lora_cfg.r,
                            lora_alpha=lora_cfg.lora_alpha,
                        )
                        setattr(self._attention[i], name, wrapped)
                elif i not in wanted and has:
                    proj.delete_adapter(adapter)

    def activate(self, adapter: str | None) -> None:
        """Make ``adapter`` the only active LoRA (``None``: none, the base projections)."""
        for i in range(len(self._attention)):
            for name in PROJECTIONS:
                proj = self._proj(i, name)
                if not isinstance(proj, LoraLinear):
                    continue
                if adapter is not None and adapter in proj.lora_A:
                    proj.enable_adapters(True)
                    proj.set_adapter(adapter)
                else:
                    proj.enable_adapters(False)

    def delete(self, adapter: str) -> None:
        for i in self.adapter_layers(adapter):
            for name in PROJECTIONS:
                with warnings.catch_warnings():
                    # peft announces which adapter it makes active instead; the model
                    # re-applies its own choice right after (MPnPModel._refresh_lora).
                    warnings.simplefilter("ignore", UserWarning)
                    self._proj(i, name).delete_adapter(adapter)
        self._configs.pop(adapter, None)

    def parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        """The adapter's tensors by stable name: ``{layer}.{k_proj|v_proj}.lora_{A|B}``."""
        out = {}
        for i in self.adapter_layers(adapter):
            for name in PROJECTIONS:
                proj = self._proj(i, name)
                out[f"{i}.{name}.lora_A"] = proj.lora_A[adapter].weight
                out[f"{i}.{name}.lora_B"] = proj.lora_B[adapter].weight
        return out
