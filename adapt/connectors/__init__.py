"""Connectors: mPnP and the baselines behind one interface, with a registry.

``create_connector(kind, llm, tokenizer, modalities, config)`` builds one;
``list_connectors()`` names them. Registering a name twice is an error.
"""

from __future__ import annotations

from collections.abc import Callable

from adapt.connectors.base import Connector, ConnectorConfig

_REGISTRY: dict[str, type[Connector]] = {}


def register_connector(cls: type[Connector]) -> type[Connector]:
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    if cls.kind in _REGISTRY:
        raise ValueError(f"connector {cls.kind!r} is already registered")
    _REGISTRY[cls.kind] = cls
    return cls


def list_connectors() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_connector(kind: str, llm, tokenizer, modalities, config: ConnectorConfig | None = None,
                     **kwargs) -> Connector:
    _load_builtin()
    if kind not in _REGISTRY:
        raise KeyError(f"unknown connector {kind!r}; choose from {sorted(_REGISTRY)}")
    return _REGISTRY[kind](llm, tokenizer, modalities, config or ConnectorConfig(), **kwargs)


def _load_builtin() -> None:
    # Importing the modules registers them (once).
    from adapt.connectors import baselines, mpnp  # noqa: F401


__all__: list[str | Callable] = [
    "Connector", "ConnectorConfig", "create_connector", "list_connectors", "register_connector",
]
