"""The learning-rate schedule of every trainer here (SAE runs, `train-lm`, the MLP's SAEs): linear
warmup over `warmup_samples`, then linear or cosine decay to `min_lr_factor` x lr at the last
step, or constant (`OptimizerConfig`)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from e2e_sae.config import OptimizerConfig


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, schedule: str, min_factor: float
) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1 - (1 - min_factor) * progress
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(
    optimizer: torch.optim.Optimizer, optim: OptimizerConfig, total_steps: int, world_size: int = 1
) -> LambdaLR:
    """`optim`'s schedule over `total_steps` optimizer steps (`world_size` processes, each
    stepping `samples_per_step` samples)."""
    warmup = optim.warmup_samples // (optim.samples_per_step * world_size)
    kind, lo = optim.lr_schedule, optim.min_lr_factor
    return LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps, kind, lo))
