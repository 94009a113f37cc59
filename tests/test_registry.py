"""One registry type: every pluggable kind fails alike on an unknown or duplicate name."""

from __future__ import annotations

import sys

import pytest

from adapt.connectors import CONNECTORS, create_connector, list_connectors
from daemon.backend import BACKENDS, create_backend, list_backends
from encoders import ENCODERS, create_encoder, list_encoders
from mpnp.registry import Registry, UnknownNameError
from policies.context import POLICIES, create_policy, list_policies
from policies.power import MONITORS, create_power_monitor, list_power_monitors
from scenes.sensors import SENSORS


@pytest.mark.parametrize("create, listing, what", [
    (lambda: create_connector("nope", None, None, []), list_connectors, "connector"),
    (lambda: create_policy("nope"), list_policies, "context policy"),
    (lambda: create_power_monitor("nope"), list_power_monitors, "power monitor"),
    (lambda: create_backend("nope"), list_backends, "model backend"),
    (lambda: create_encoder("nope"), list_encoders, "encoder kind"),
])
def test_unknown_names_raise_one_error_naming_the_known_ones(create, listing, what):
    with pytest.raises(UnknownNameError) as info:
        create()
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"unknown {what} 'nope'; known: ")
    assert listing() and all(name in str(info.value) for name in listing())


@pytest.mark.parametrize("registry", [CONNECTORS, POLICIES, MONITORS, BACKENDS, ENCODERS,
                                      SENSORS])
def test_registering_a_name_twice_is_refused(registry):
    taken = registry.names()[0]
    registry.get(taken)  # a lazy entry registers itself now
    with pytest.raises(ValueError, match="already registered"):
        registry.register(taken, object())


def test_lazy_entries_are_listed_without_importing_them(monkeypatch):
    registry: Registry[str] = Registry("widget", lazy={"heavy": "tests_fake_heavy_module"})
    registry.register("light", "x")
    assert registry.names() == ["heavy", "light"] and "heavy" in registry
    assert "tests_fake_heavy_module" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        registry.get("heavy")  # named, so its module is imported now
    assert "mpnp" in list_backends()


def test_unregister_removes_an_entry_and_ignores_unknown_names():
    registry: Registry[int] = Registry("thing")
    registry.register("a", 1)
    registry.unregister("a")
    registry.unregister("never-there")
    with pytest.raises(UnknownNameError):
        registry.get("a")
    registry.register("a", 2)  # the name is free again
    assert registry.get("a") == 2
