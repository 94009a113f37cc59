"""Mixed precision of training steps: bfloat16 autocast where the device has the units.

Importing this module does not import torch (configuration files validate
:data:`AUTOCAST_MODES` without it); the functions do.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

#: :attr:`adapt.trainer.TrainConfig.autocast` values.
AUTOCAST_MODES = ("off", "auto", "bfloat16")


@lru_cache(maxsize=8)  # asked once per training step: the answer never changes
def bf16_supported(device) -> bool:
    """Whether ``device`` (a :class:`torch.device`) has fast bfloat16 matrix multiplication:
    oneDNN's check for AMX / AVX512-BF16 on a CPU, compute capability 8+ on CUDA. Without
    it bfloat16 autocast emulates the arithmetic and is slower than float32."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return bool(check()) if check is not None else False
        except RuntimeError:
            return False
    return False


def autocast_enabled(mode: str, device) -> bool:
    """Whether :attr:`TrainConfig.autocast` ``mode`` means bfloat16 on ``device``."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {AUTOCAST_MODES}, got {mode!r}")
    return mode == "bfloat16" or (mode == "auto" and bf16_supported(device))


def autocast_context(mode: str, device) -> contextlib.AbstractContextManager:
    """The autocast a training step runs under for :attr:`TrainConfig.autocast` ``mode``."""
    import torch

    if not autocast_enabled(mode, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def precision_label(mode: str, device) -> str:
    """What a run's training steps compute in, for reports: ``"bfloat16 autocast"`` or
    ``"float32"`` (``mode`` resolved on ``device``)."""
    return "bfloat16 autocast" if autocast_enabled(mode, device) else "float32"
