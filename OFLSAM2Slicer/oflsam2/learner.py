"""The mapping network M: generic backbone features -> target features (a learned prompt)."""

from __future__ import annotations

import torch
from torch import nn


class MappingNet(nn.Module):
    """A few 3x3 convolutions on the stride-16 embedding F.

    Output T = F + delta(F) has F's shape (the residual starts at zero, so an untrained
    M hands SAM2 its own features); a 1x1 head gives a coarse target mask on the same
    grid, which also serves as a presence signal and a box prompt.
    """

    def __init__(self, channels: int = 256, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
            nn.GroupNorm(8, hidden),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            nn.GroupNorm(8, hidden),
            nn.GELU(),
        )
        self.to_target = nn.Conv2d(hidden, channels, kernel_size=1)
        self.coarse = nn.Conv2d(hidden, 1, kernel_size=1)
        nn.init.zeros_(self.to_target.weight)
        nn.init.zeros_(self.to_target.bias)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(f)
        return f + self.to_target(h), self.coarse(h)


class Learner(nn.Module):
    """M and A for one segment, trained together."""

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        from .fusion import AdaptiveFusion

        self.mapping = MappingNet(channels)
        self.fusion = AdaptiveFusion(channels)

    def forward(self, f: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused features for the decoder and the coarse target logits."""
        t, coarse = self.mapping(f)
        fused, _ = self.fusion(t, p)
        return fused, coarse


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
