"""Adaptive fusion of target features T and SAM2's memory-attention features P."""

from __future__ import annotations

import torch
from torch import nn


class AdaptiveFusion(nn.Module):
    """fused = g_T * T + g_P * P with per-pixel gates g = sigmoid(conv([T, P])).

    Starts close to SAM2's own behaviour (g_P near 1, g_T small) so that an untrained
    fusion does not spoil what SAM2's memory already gets right.
    """

    def __init__(
        self, channels: int = 256, hidden: int = 32, gate_t: float = -3.0, gate_p: float = 3.0
    ) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(2 * channels, hidden, kernel_size=1)
        self.mix = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.gates = nn.Conv2d(hidden, 2, kernel_size=1)
        nn.init.zeros_(self.gates.weight)
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([gate_t, gate_p]))

    def forward(self, t: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.reduce(torch.cat([t, p], dim=1)))
        h = torch.relu(self.mix(h))
        g = torch.sigmoid(self.gates(h))
        return g[:, :1] * t + g[:, 1:] * p, g
