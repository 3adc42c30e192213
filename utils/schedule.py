"""Learning-rate schedule: linear warm-up per iteration, then cosine decay per iteration to min_lr."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """LR for optimizer step `step` (0-based) of `total_steps`.

    Warm-up: base_lr * (step + 1) / warmup_steps for the first `warmup_steps` steps, so the first
    step is not taken at LR 0. Then cosine from base_lr (at the first post-warm-up step) to min_lr
    (at the last step).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets the optimizer's LR before each optimizer step. Stateless apart from its arguments."""

    def __init__(self, optimizer, steps_per_epoch: int, max_epoch: int, wp_epoch: int, base_lr: float, min_lr: float):
        self.optimizer = optimizer
        self.total_steps = steps_per_epoch * max_epoch
        self.warmup_steps = min(steps_per_epoch * wp_epoch, self.total_steps)
        self.base_lr, self.min_lr = base_lr, min_lr

    def set(self, step: int) -> float:
        lr = lr_at(step, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
