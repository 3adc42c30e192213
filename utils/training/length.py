"""How long a run trains (Ultralytics' `time=` and `patience=`): --max_epoch, shortened by a --time_budget (a budget
never lengthens a run beyond --max_epoch), and --patience, which stops when validation acc@1 stops improving.

The budget is planned after the first timed epoch and planned again, for good, after the second: the first epoch
of a process carries one-time costs (the precision probe, kernel selection, loading and decoding the data, building
a cache, torch.compile) that the later ones do not, so an estimate from it alone buys fewer epochs than the budget
holds. The second plan counts the time already spent and divides what is left by the second epoch's time."""

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
        self.planned = max_epoch  # --max_epoch: the most a budget may give
        self.fixed = self.budget_s <= 0  # epochs decided by --max_epoch, or already by the budget
        self.spent_s, self.timed = 0.0, 0  # this process's epochs so far: their seconds and count
        self.stop_reason: str | None = None
        # evaluations since the best one, from the history, so a resumed run keeps counting
        evaluated = [r["val_acc1"] for r in history or [] if r.get("val_acc1") not in (None, "")]
        best = max(range(len(evaluated)), key=lambda i: evaluated[i], default=None)
        self.best = evaluated[best] if best is not None else -math.inf
        self.stale = len(evaluated) - 1 - best if best is not None else 0

    def after_epoch(self, epoch: int, epoch_seconds: float, val_acc1: float | None, scheduler: WarmupSchedule,
                    step: int) -> bool:
        """Called after 1-based `epoch`. Under a time budget, plans the epoch count after the first and (for good) the
        second timed epoch, fitting the LR schedule to it; returns True when training should stop early (patience)."""
        if not self.fixed:
            self.plan(epoch, all_reduce_sum([epoch_seconds], self.device)[0] / world_size(), scheduler, step)
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

    def plan(self, epoch: int, seconds: float, scheduler: WarmupSchedule, step: int) -> None:
        """The epochs the rest of the budget holds at `seconds` per epoch (the same on every rank)."""
        self.spent_s += seconds
        self.timed += 1
        self.fixed = self.timed >= 2
        fits = int(max(self.budget_s - self.spent_s, 0.0) // max(seconds, 1e-9))
        before, self.max_epoch = self.max_epoch, min(self.planned, epoch + fits)
        if self.max_epoch != before:
            scheduler.set_length(self.max_epoch)
            scheduler.seek(step)
        budget = f"time budget {self.budget_s / 60:g} min: epoch {epoch} took {seconds:.3f} s"
        if self.timed == 1:
            budget += " (with one-time costs; planned again after the next epoch)"
        else:
            budget += f" ({self.spent_s:.3f} s of the budget spent)"
        if self.max_epoch == self.planned:
            self.log(f"{budget}, so all {self.planned} epochs of --max_epoch fit (the budget only shortens a run)")
        else:
            self.log(f"{budget}, so the run trains {self.max_epoch} of the {self.planned} epochs of --max_epoch "
                     "(LR schedule fitted to them)")

