"""Few-shot and online training of a Learner through the frozen mask decoder."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbones.base import Backbone
from .learner import Learner
from .settings import Settings


@dataclass
class Sample:
    """One training slice: features, memory features, decoder extras and the target."""

    embed: torch.Tensor  # (C, h, w) float16 on CPU
    memory: torch.Tensor  # (C, h, w) P for this slice
    hires: list[torch.Tensor]  # each (c, H, W)
    target: torch.Tensor  # (1, L, L) float in [0, 1] at the decoder's mask size
    box: torch.Tensor | None = None  # (4,) prompt box in input pixels (backbones that need one)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice, per batch."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).flatten(1).sum(1)
    denom = p.flatten(1).sum(1) + target.flatten(1).sum(1)
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    return bce + dice.mean()


def _stack(samples: list[Sample], device: torch.device):
    f = torch.stack([s.embed for s in samples]).to(device, torch.float32)
    p = torch.stack([s.memory for s in samples]).to(device, torch.float32)
    hires = [
        torch.stack([s.hires[i] for s in samples]).to(device, torch.float32)
        for i in range(len(samples[0].hires))
    ]
    y = torch.stack([s.target for s in samples]).to(device, torch.float32)
    boxes = None
    if samples[0].box is not None:
        boxes = torch.stack([s.box for s in samples]).to(device, torch.float32)
    return f, p, hires, y, boxes


def _augment(f, p, hires, y, boxes, gen: torch.Generator, size: int, noise: float):
    """Joint flips of every spatial tensor, plus noise on F (cheap stand-ins for image augmentation)."""
    for dim in (-1, -2):
        if torch.rand((), generator=gen) < 0.5:
            f, p, y = f.flip(dim), p.flip(dim), y.flip(dim)
            hires = [h.flip(dim) for h in hires]
            if boxes is not None:
                i0, i1 = (0, 2) if dim == -1 else (1, 3)
                b = boxes.clone()
                b[:, i0], b[:, i1] = size - boxes[:, i1], size - boxes[:, i0]
                boxes = b
    jitter = torch.randn(f.shape, generator=gen) * (noise * f.std())
    return f + jitter.to(f.device), p, hires, y, boxes


def train_steps(
    learner: Learner,
    backbone: Backbone,
    optimizer: torch.optim.Optimizer,
    samples: list[Sample],
    steps: int,
    gen: torch.Generator,
    settings: Settings,
    batch: int | None = None,
    augment: bool = True,
    patience: int | None = -1,
    decoder_every: int = 1,
    cancel: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """A bounded number of Adam steps with early stopping; returns the losses.

    ``batch`` defaults to ``settings.fit_batch``, ``patience`` to ``settings.patience``
    (None: no early stopping). With ``decoder_every`` > 1 only every n-th step goes through
    the frozen decoder (the expensive part); the others train the coarse head alone.
    """
    batch = settings.fit_batch if batch is None else batch
    if patience == -1:
        patience = settings.patience
    weight = settings.coarse_weight
    learner.train()
    losses: list[float] = []
    best, stale = float("inf"), 0
    dev = backbone.device
    for step in range(steps):
        if cancel is not None and cancel.is_set():
            break
        if len(samples) > batch:
            idx = torch.randperm(len(samples), generator=gen)[:batch].tolist()
            chosen = [samples[i] for i in idx]
        else:
            chosen = samples
        f, p, hires, y, boxes = _stack(chosen, dev)
        if augment:
            f, p, hires, y, boxes = _augment(
                f, p, hires, y, boxes, gen, backbone.input_size, settings.feature_noise
            )
        y_coarse = F.adaptive_avg_pool2d(y, f.shape[-2:])  # the coarse head's grid is F's
        if step % decoder_every == 0:
            fused, coarse = learner(f, p)
            dec = backbone.decode(fused, hires, boxes=boxes)
            loss = seg_loss(dec.logits, y) + weight * seg_loss(coarse, y_coarse)
        else:  # the cheap part alone: the coarse head (presence and box) needs no decoder
            _, coarse = learner.mapping(f)
            loss = weight * seg_loss(coarse, y_coarse)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        losses.append(value)
        if step % decoder_every:
            continue  # early stopping watches the full loss only
        if progress is not None:
            progress(step + 1, steps)
        if value < best - 1e-3:
            best, stale = value, 0
        else:
            stale += 1
            if patience is not None and stale >= patience:
                break
    learner.eval()
    return losses
