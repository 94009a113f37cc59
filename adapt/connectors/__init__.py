"""Connectors: mPnP and the baselines behind one interface, with a registry.

``create_connector(kind, llm, tokenizer, modalities, config)`` builds one;
``list_connectors()`` names them. Registering a name twice is a ``ValueError``, an unknown
kind a :class:`mpnp.registry.UnknownNameError` (a ``ValueError``) naming the known ones.
"""

from __future__ import annotations

from adapt.connectors.base import Connector, ConnectorConfig
from mpnp.registry import Registry

#: Importing the modules registers the built-in connectors (on first use).
CONNECTORS: Registry[type[Connector]] = Registry(
    "connector", builtin_modules=("adapt.connectors.baselines", "adapt.connectors.mpnp"))


def register_connector(cls: type[Connector]) -> type[Connector]:
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    return CONNECTORS.register(cls.kind, cls)


def list_connectors() -> list[str]:
    return CONNECTORS.names()


def create_connector(kind: str, llm, tokenizer, modalities, config: ConnectorConfig | None = None,
                     **kwargs) -> Connector:
    return CONNECTORS.get(kind)(llm, tokenizer, modalities, config or ConnectorConfig(), **kwargs)


__all__ = ["CONNECTORS", "Connector", "ConnectorConfig", "create_connector", "list_connectors",
           "register_connector"]
