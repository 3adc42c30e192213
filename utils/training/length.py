"""How long a run trains (Ultralytics' `time=` and `patience=`): --max_epoch, shortened by a --time_budget once the
first epoch has been timed (a budget never lengthens a run), and --patience, which stops when validation acc@1 stops
improving."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from utils.distributed import all_reduce_sum, world_size
from utils.training.schedule import WarmupSchedule


class TrainingLength:
    """The run's epoch count and its early-stopping rule; `after_epoch` is called once per finished epoch."""

    def __init__(self, max_epoch: int, *, start_epoch: int = 0, time_budget_min: float = 0.0, patience: int = 0,
                 history: list[dict] | None = None, device: torch.device | None = None, log: Callable[[str], None] = print):
        self.max_epoch, self.start_epoch, self.patience, self.log = max_epoch, start_epoch, patience, log
        self.device = device or torch.device("cpu")
        self.budget_s = time_budget_min * 60.0
        self.fixed = self.budget_s <= 0  # epochs decided by --max_epoch, or already by the budget
        self.stop_reason: str | None = None
        # evaluations since the best one, from the history, so a resumed run keeps counting
        evaluated = [r["val_acc1"] for r in history or [] if r.get("val_acc1") not in (None, "")]
        best = max(range(len(evaluated)), key=lambda i: evaluated[i], default=None)
        self.best = evaluated[best] if best is not None else -math.inf
        self.stale = len(evaluated) - 1 - best if best is not None else 0

    def after_epoch(self, epoch: int, epoch_seconds: float, val_acc1: float | None, scheduler: WarmupSchedule,
                    step: int) -> bool:
        """Called after 1-based `epoch`. Fixes the epoch count on the first call under a time budget (stretching or
        shrinking the LR schedule to it); returns True when training should stop early (patience)."""
        if not self.fixed:
            seconds = all_reduce_sum([epoch_seconds], self.device)[0] / world_size()  # the same on every rank
            fits = int(self.budget_s // max(seconds, 1e-9))
            planned, self.max_epoch = self.max_epoch, min(self.max_epoch, max(epoch, self.start_epoch + fits))
            self.fixed = True
            if self.max_epoch == planned:
                self.log(f"time budget {self.budget_s / 60:g} min: epoch {epoch} took {seconds:.3f} s, so all "
                         f"{planned} epochs of --max_epoch fit (the budget only shortens a run)")
            else:
                scheduler.set_length(self.max_epoch)
                scheduler.seek(step)
                self.log(f"time budget {self.budget_s / 60:g} min: epoch {epoch} took {seconds:.3f} s, so the run trains "
                         f"{self.max_epoch} of the {planned} epochs of --max_epoch (LR schedule fitted to them)")
        if val_acc1 is not None and self.patience > 0:
            if val_acc1 > self.best:
                self.best, self.stale = val_acc1, 0
            else:
                self.stale += 1
            if self.stale >= self.patience and epoch < self.max_epoch:
                self.stop_reason = (f"early stop after epoch {epoch}: validation acc@1 has not improved for {self.patience} "
                                    f"evaluations (best {self.best:.4f}; best.pth holds it)")
                self.log(self.stop_reason)
                return True
        return False

