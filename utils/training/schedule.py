"""Learning-rate schedule: linear warm-up per optimizer step, then cosine decay per step to min_lr, as a torch LRScheduler.

Every parameter group follows the curve scaled to its own initial LR (a group built at 0.1x base_lr ends at
0.1x min_lr; groups at base_lr get exactly lr_at's values). The scheduler is stepped after every optimizer step,
so before step k the groups hold the LR of step k. Its state is the position on the curve (`last_epoch`, counted
in optimizer steps); the curve's shape comes from the flags, so a resumed run may extend it (--max_epoch).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """LR for optimizer step `step` (0-based) of `total_steps`.

    Warm-up: base_lr * (step + 1) / warmup_steps for the first `warmup_steps` steps, so the first
    step is not taken at LR 0. Then cosine from base_lr (at the first post-warm-up step) to min_lr
    (at the last step); after the last step it stays at min_lr.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """Warm-up for `wp_epoch` epochs, then cosine to min_lr, over `steps_per_epoch * max_epoch` optimizer steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, max_epoch: int, wp_epoch: float,
                 base_lr: float, min_lr: float):
        self.total_steps = steps_per_epoch * max_epoch
        self.warmup_steps = min(int(steps_per_epoch * wp_epoch), self.total_steps)
        self.base_lr, self.min_lr = base_lr, min_lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        lr = lr_at(self.last_epoch, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr)
        return [lr * (initial / self.base_lr) if self.base_lr else lr for initial in self.base_lrs]

    def seek(self, step: int) -> None:
        """Jump to optimizer step `step` (resume, --start_epoch); re-asserts each group's initial LR, which
        loading an optimizer state dict overwrites with the checkpoint's."""
        self.last_epoch = step
        for group, initial, lr in zip(self.optimizer.param_groups, self.base_lrs, self.get_lr()):
            group["initial_lr"], group["lr"] = initial, lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seek(state_dict["last_epoch"])
