"""AdamW over the trainable parameters and the learning-rate schedules (linear warm-up, then cosine or
constant)."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, train) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the stage leaves no parameter trainable")
    return torch.optim.AdamW(
        params,
        lr=train.lr,
        betas=tuple(train.betas),
        weight_decay=train.weight_decay,
        foreach=False,  # the same arithmetic whatever the parameter grouping: exact resume tests
    )


def warmup_steps(train, max_steps: int) -> int:
    return train.warmup_steps or int(round(train.warmup_ratio * max_steps))


def lr_factor(step: int, *, schedule: str, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(max_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train, max_steps: int):
    warmup = warmup_steps(train, max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, schedule=train.schedule, warmup=warmup, max_steps=max_steps, min_ratio=train.min_lr_ratio
        ),
    )
