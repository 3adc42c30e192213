"""How long a run trains (Ultralytics' `time=` and `patience=`): --max_epoch, shortened by a --time_budget (a budget
never lengthens a run beyond --max_epoch), and --patience, which stops when validation acc@1 stops improving.

The budget is wall time from the start of train.py to its end: start-up, the epochs with their validation, and the
final TTA evaluation. It is planned after the first epoch, planned again after the second (the first carries
one-time costs: the precision probe, kernel selection, decoding the data, building a cache, torch.compile, so an
estimate from it alone buys fewer epochs than the budget holds), and checked after every later epoch against the
pace of the last two epochs: a machine that slows down mid-run (a shared VM, thermal limits) shortens the run and
the LR schedule is fitted to the new length, so the run still ends inside the budget. From the third epoch on a
plan only ever shortens the run, so one fast epoch never stretches a schedule that is already decaying."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from utils.distributed import all_reduce_sum, world_size
from utils.training.schedule import WarmupSchedule

PACE_EPOCHS = 2  # the pace of a run is the mean of its last two timed epochs (the first one excluded once it can be)


class TrainingLength:
    """The run's epoch count and its early-stopping rule; `after_epoch` is called once per finished epoch."""

    def __init__(self, max_epoch: int, *, time_budget_min: float = 0.0, patience: int = 0,
                 history: list[dict] | None = None, device: torch.device | None = None, log: Callable[[str], None] = print,
                 started: float | None = None, clock: Callable[[], float] = time.perf_counter):
        self.max_epoch, self.patience, self.log = max_epoch, patience, log
        self.device = device or torch.device("cpu")
        self.budget_s = time_budget_min * 60.0
        self.clock = clock  # the budget's clock; `started` is its reading at the start of the run
        self.started = clock() if started is None else started
        self.planned = max_epoch  # --max_epoch: the most a budget may give
        self.epoch_s: list[float] = []  # this process's timed epochs (training + validation), in order
        self.stop_reason: str | None = None
        # evaluations since the best one, from the history, so a resumed run keeps counting
        evaluated = [r["val_acc1"] for r in history or [] if r.get("val_acc1") not in (None, "")]
        best = max(range(len(evaluated)), key=lambda i: evaluated[i], default=None)
        self.best = evaluated[best] if best is not None else -math.inf
        self.stale = len(evaluated) - 1 - best if best is not None else 0

    def after_epoch(self, epoch: int, epoch_seconds: float, val_acc1: float | None, scheduler: WarmupSchedule,
                    step: int, *, tail_s: float = 0.0) -> bool:
        """Called after 1-based `epoch`. Under a time budget, plans the epoch count (fitting the LR schedule to it),
        keeping `tail_s` seconds for what runs after the last epoch (the final TTA evaluation); returns True when
        training should stop early (patience)."""
        if self.budget_s > 0:
            spent = self.clock() - self.started
            seconds, spent, tail_s = (value / world_size() for value in
                                      all_reduce_sum([epoch_seconds, spent, tail_s], self.device))
            self.plan(epoch, seconds, spent, tail_s, scheduler, step)
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

    def plan(self, epoch: int, seconds: float, spent: float, tail_s: float, scheduler: WarmupSchedule, step: int) -> None:
        """The epochs the rest of the budget holds (the same on every rank): what is left after `spent` seconds and
        the `tail_s` reserve, at the pace of the last epochs."""
        self.epoch_s.append(seconds)
        timed = len(self.epoch_s)
        recent = self.epoch_s[1:][-PACE_EPOCHS:] if timed > 1 else self.epoch_s
        pace = sum(recent) / len(recent)
        fits = int(max(self.budget_s - spent - tail_s, 0.0) // max(pace, 1e-9))
        target = min(self.planned, epoch + fits)
        if timed >= 3:
            target = min(target, self.max_epoch)  # later plans only shorten
        before, self.max_epoch = self.max_epoch, target
        if target != before:
            scheduler.set_length(target)
            scheduler.seek(step)
        elif timed >= 3:
            return  # on pace: nothing to say
        budget = f"time budget {self.budget_s / 60:g} min: "
        if timed == 1:
            budget += f"epoch {epoch} took {seconds:.3f} s (with one-time costs; planned again after the next epoch)"
        elif len(recent) == 1:
            budget += f"epoch {epoch} took {seconds:.3f} s"
        else:
            budget += f"epochs {epoch - len(recent) + 1}-{epoch} took {pace:.3f} s on average"
        budget += f", {spent:.3f} s spent" + (f", {tail_s:.3f} s kept for the final TTA evaluation" if tail_s > 0 else "")
        if target == self.planned:
            self.log(f"{budget}: all {self.planned} epochs of --max_epoch fit (the budget only shortens a run)")
        elif timed >= 3:
            self.log(f"{budget}: the run is slower than planned, so it now trains {target} of the {self.planned} epochs "
                     "of --max_epoch (LR schedule fitted to them)")
        else:
            self.log(f"{budget}: the run trains {target} of the {self.planned} epochs of --max_epoch "
                     "(LR schedule fitted to them)")
