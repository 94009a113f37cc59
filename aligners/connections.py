"""Trainable latent connections ``α_j = sigmoid(w_j / T)`` (README: How the connection works)."""

from __future__ import annotations

import torch
from torch import nn


class LatentConnections(nn.Module):
    """One connection weight per LLM block.

    A weight exists for every block so that N can change at runtime without losing what was
    learned; only the weights of the connected blocks (the last N) take part in a forward,
    so only they receive gradients.
    """

    def __init__(self, num_layers: int, temperature: float = 1.0, trainable: bool = True,
                 init_alpha: float | None = None):
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        self.temperature = temperature
        if init_alpha is None:  # official initialisation: w ~ U(-1, 1)
            weight = torch.empty(num_layers).uniform_(-1.0, 1.0)
        else:  # every block starts at alpha = init_alpha
            logit = float(torch.logit(torch.tensor(init_alpha, dtype=torch.float64)))
            weight = torch.full((num_layers,), temperature * logit)
        self.weight = nn.Parameter(weight, requires_grad=trainable)

    def alpha(self, layer_idx: int) -> torch.Tensor:
        """``α_j`` of one block, a 0-d tensor."""
        return torch.sigmoid(self.weight[layer_idx] / self.temperature)

    def extra_repr(self) -> str:
        return f"num_layers={self.weight.numel()}, temperature={self.temperature}"
