"""Learning-rate schedules per optimizer step, as a torch LRScheduler: warm-up, then a decay to min_lr.

--sched cosine (default): linear warm-up, cosine decay. linear: linear warm-up, linear decay. onecycle: the LR curve
of torch's OneCycleLR (Smith's one-cycle policy: cosine rise from base_lr/25 over the warm-up, cosine fall to
min_lr), written here as one more shape so that every schedule resumes, extends (--max_epoch on --resume) and
rescales (--time_budget) the same way; OneCycleLR itself fixes its length when built. Momentum is not cycled.

Every parameter group follows the curve scaled to its own initial LR (a group built at 0.1x base_lr ends at
0.1x min_lr; groups at base_lr get exactly lr_at's values). The scheduler is stepped after every optimizer step,
so before step k the groups hold the LR of step k. Its state is the position on the curve (`last_epoch`, counted
in optimizer steps); the curve's shape comes from the flags, so a resumed run may extend it (--max_epoch).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

SCHEDULES = ("cosine", "linear", "onecycle")
ONECYCLE_DIV = 25.0  # OneCycleLR's div_factor: the one-cycle curve starts at base_lr / 25


def _cosine(start: float, end: float, progress: float) -> float:
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float, shape: str = "cosine") -> float:
    """LR for optimizer step `step` (0-based) of `total_steps`.

    cosine / linear: warm-up base_lr * (step + 1) / warmup_steps for the first `warmup_steps` steps, so the first
    step is not taken at LR 0; then from base_lr (at the first post-warm-up step) down to min_lr (at the last step),
    along a half cosine or a straight line. onecycle: OneCycleLR's curve with pct_start = warmup_steps / total_steps
    (cosine from base_lr / 25 at step 0 to base_lr at step warmup_steps - 1, then cosine to min_lr at the last step).
    After the last step the LR stays at min_lr.
    """
    if shape == "onecycle" and warmup_steps > 1 and step < warmup_steps:
        return _cosine(base_lr / ONECYCLE_DIV, base_lr, step / (warmup_steps - 1))
    if shape != "onecycle" and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    start = warmup_steps - 1 if shape == "onecycle" and warmup_steps > 1 else warmup_steps
    decay_steps = max(1, total_steps - start - 1)
    progress = min(1.0, max(0.0, (step - start) / decay_steps))
    if shape == "linear":
        return base_lr + (min_lr - base_lr) * progress
    return _cosine(base_lr, min_lr, progress)


class WarmupSchedule(LRScheduler):
    """Warm-up for `wp_epoch` epochs, then the `shape`'s decay to min_lr, over `steps_per_epoch * max_epoch` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, max_epoch: int, wp_epoch: float,
                 base_lr: float, min_lr: float, shape: str = "cosine"):
        if shape not in SCHEDULES:
            raise ValueError(f"unknown schedule {shape!r}: choose from {', '.join(SCHEDULES)}")
        self.steps_per_epoch, self.wp_epoch, self.shape = steps_per_epoch, wp_epoch, shape
        self.base_lr, self.min_lr = base_lr, min_lr
        self.set_length(max_epoch)
        super().__init__(optimizer)

    def set_length(self, max_epoch: int) -> None:
        """Stretch or shrink the curve to `max_epoch` epochs (--time_budget); takes effect at the next step or seek."""
        self.total_steps = self.steps_per_epoch * max_epoch
        self.warmup_steps = min(int(self.steps_per_epoch * self.wp_epoch), self.total_steps)

    def get_lr(self) -> list[float]:
        lr = lr_at(self.last_epoch, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr, self.shape)
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
