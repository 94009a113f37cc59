"""Shared fixtures. Everything runs on the CPU with tiny random models unless marked."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see mpnp/cli.py

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILIES = ("llama", "qwen2", "mistral", "opt")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family):
    from mpnp.tiny import tiny_llm

    return tiny_llm(family, num_layers=4)


@pytest.fixture
def llama():
    from mpnp.tiny import tiny_llm

    return tiny_llm("llama", num_layers=4)
