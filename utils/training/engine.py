"""The training loop, written once: train.py, the benchmarks and the tests all run `train_one_epoch`.

Host synchronisation happens only where a value is shown or logged (every `log_every` micro-batches and at the
end of the epoch): loss and accuracy are summed on the device in between, so a GPU never waits for the Python
side. A non-finite loss is caught at those points, before any checkpoint can be written from the diverged weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from utils.distributed import all_gather_object, all_reduce_sum, is_distributed, rank, world_size
from utils.errors import InputError
from utils.evaluation.loop import progress
from utils.precision import autocast
from utils.training.interrupt import GracefulStop
from utils.training.rng import rng_state, set_rng_state


@dataclass(kw_only=True)
class TrainState:
    """What the loop needs besides the model and data; `step` counts optimizer steps over the whole run."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    ema: object | None = None  # utils.training.ema.ModelEMA
    step: int = 0
    accumulation: int = 1
    clip_grad: float = 0.0
    amp: bool = False
    amp_dtype: str = "auto"
    channels_last: bool = False
    log_every: int = 50
    # (step, {"loss", "acc1", "lr", "images_per_s"[, "grad_norm"]}) at every log point
    on_log: Callable[[int, dict], None] | None = None
    mix: Callable | None = None  # (images, int targets) -> (mixed images, soft targets): Mixup/CutMix on the batch
    track_grad_norm: bool = False  # measure the gradient norm of every step (also measured whenever clip_grad > 0)
    # called once with the next epoch's first batch as the network gets it (after Mixup/CutMix) and its (dominant) labels
    on_first_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def __post_init__(self):
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda", enabled=False)

    def shown_lr(self, previous: float) -> float:
        """The LR to report: the next step's, or after the run's last step the one that step used."""
        return self.optimizer.param_groups[0]["lr"] if self.step < self.scheduler.total_steps else previous


@dataclass(frozen=True)
class EpochProgress:
    """Where a stopped epoch stands: `batches` micro-batches of `of` done (an optimizer-step boundary), the epoch's
    running sums over every process and its time so far, and each process's random generators at that point, so the
    rest of the epoch can be trained exactly as an uninterrupted run trains it (train_one_epoch(..., resume_from=...))."""

    batches: int
    of: int  # micro-batches in the whole epoch: a resumed epoch must be cut the same way
    loss_sum: float  # summed over processes: on resume rank 0 carries them, the others start from 0
    correct: float
    seen: int
    seconds: float
    lr: float
    rng: list[dict]  # utils.training.rng.rng_state() of each rank, in rank order

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EpochProgress:
        return cls(**{key: d[key] for key in cls.__dataclass_fields__})


def batches_from(loader, start: int):
    """An iterator over `loader` from batch `start`: loaders that can seek (the tensor pipeline) start there; others
    (DataLoader workers) load and drop the first batches, so every worker's random state is where it was."""
    if start == 0:
        return iter(loader)
    if hasattr(loader, "iter_from"):
        return loader.iter_from(start)
    it = iter(loader)
    for _ in range(start):
        next(it)
    return it


def stop_agreed(stop: GracefulStop | None, device: torch.device, crossed_log_point: bool) -> bool:
    """Whether to end the epoch after this optimizer step. Under torchrun the ranks must agree: they compare their
    flags (a collective) only where the loop syncs anyway, at its log points."""
    if stop is None:
        return False
    if not is_distributed():
        return stop.requested
    return crossed_log_point and all_reduce_sum([float(stop.requested)], device)[0] > 0


def optimizer_step(model: nn.Module, state: TrainState) -> torch.Tensor | None:
    """Unscale, clip, step (skipped by the scaler on inf/NaN gradients), zero, update the EMA, advance the LR.
    Returns the total gradient norm before clipping (a device tensor) when clipping or tracking measured it."""
    state.scaler.unscale_(state.optimizer)
    norm = None
    if state.clip_grad > 0:
        norm = nn.utils.clip_grad_norm_(model.parameters(), state.clip_grad)
    elif state.track_grad_norm:
        norm = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(model)
    state.step += 1
    state.scheduler.step()
    return norm


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, state: TrainState, device: torch.device,
                    epoch: int, show_progress: bool = True, *, resume_from: EpochProgress | None = None,
                    stop: GracefulStop | None = None) -> dict:
    """One pass over `loader`; the optimizer steps every `accumulation` micro-batches and after the last one.

    resume_from: continue an epoch that was stopped (its first batches are skipped, its sums and random state
    restored). stop: when a stop is requested the epoch ends after the current optimizer step, and the result's
    "stopped" holds the EpochProgress to resume from (else None).

    Each micro-batch's mean loss is divided by the number of micro-batches in its window, so k
    micro-batches of b samples give the gradient of one batch of k*b samples. With `state.mix` (Mixup/CutMix) the
    loss is the cross-entropy against the soft targets, and train acc@1 counts predictions equal to the label with
    the larger mixing weight.
    """
    model.train()
    num_batches = len(loader)
    k = max(1, state.accumulation)
    amp = autocast(device, state.amp, state.amp_dtype)
    first = 0 if resume_from is None else resume_from.batches
    if resume_from is not None and resume_from.of != num_batches:
        raise InputError(f"the checkpoint stopped epoch {epoch} after batch {first} of {resume_from.of}, but this run cuts the "
                         f"epoch into {num_batches} batches: resume with the run's --batch_size, --accumulation and data")
    # [loss sum, correct] over the epoch and since the last log point, summed on the device in micro-batch order
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    window = torch.zeros(2, dtype=torch.float64, device=device)
    grad_window = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of finite gradient norms, their count]
    seen = window_seen = 0
    loss_sum = correct = 0.0
    lr = state.optimizer.param_groups[0]["lr"]
    batches = batches_from(loader, first)
    if resume_from is not None:
        if resume_from.rng:  # after the skipped batches: the generators are where the stop left them
            set_rng_state(resume_from.rng[rank()])
        lr = resume_from.lr
        if rank() == 0:
            totals += torch.tensor([resume_from.loss_sum, resume_from.correct], dtype=torch.float64, device=device)
            seen, loss_sum, correct = resume_from.seen, resume_from.loss_sum, resume_from.correct
    start = last_log = time.perf_counter() - (resume_from.seconds if resume_from is not None else 0.0)
    bar = progress(batches, show_progress, total=num_batches, initial=first, desc=f"epoch {epoch}")
    state.optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(bar, start=first):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        labels = targets
        if state.mix is not None:
            images, targets = state.mix(images, targets)
            labels = targets.argmax(1)
        if state.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if state.on_first_batch is not None:
            paused = time.perf_counter()
            state.on_first_batch(images, labels)
            state.on_first_batch = None
            drawing = time.perf_counter() - paused  # the dashboard's drawing is not training time
            start, last_log = start + drawing, last_log + drawing
        window_start = (i // k) * k
        window_len = min(k, num_batches - window_start)
        last_in_window = i == window_start + window_len - 1
        sync = contextlib.nullcontext() if last_in_window or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with amp:
                logits = model(images)
                loss = criterion(logits, targets)
            state.scaler.scale(loss / window_len).backward()
        if last_in_window:
            norm = optimizer_step(model, state)
            if norm is not None:
                finite = torch.isfinite(norm)
                grad_window += torch.stack([torch.where(finite, norm.double(), 0.0), finite.double()])
            lr = state.shown_lr(lr)
        n = labels.shape[0]
        batch = torch.stack([loss.detach().double() * n, (logits.detach().argmax(1) == labels).sum().double()])
        totals += batch
        window += batch
        seen += n
        window_seen += n
        crossed = (i + 1) // state.log_every != (window_start) // state.log_every
        if last_in_window and i + 1 < num_batches and stop_agreed(stop, device, crossed):
            bar.close()
            loss_sum, correct, seen_all = all_reduce_sum([*totals.tolist(), seen], device)
            return {"stopped": EpochProgress(i + 1, num_batches, loss_sum, correct, int(seen_all),
                                             time.perf_counter() - start, lr, all_gather_object(rng_state()))}
        if (i + 1) % state.log_every == 0 or i + 1 == num_batches:
            synced = torch.cat([totals, window, grad_window]).tolist()  # the one host sync
            loss_sum, correct, window_loss, window_correct, grad_sum, grad_count = synced
            now = time.perf_counter()
            if not math.isfinite(window_loss):
                # bad hyper-parameters, not a bug: one line, exit 2, and the epoch's diverged weights are never saved
                raise InputError(f"training diverged: the loss became {window_loss / window_seen:g} in epoch {epoch} "
                                 f"(by batch {i + 1} of {num_batches}), nothing of this epoch was saved; fix: lower "
                                 "--base_lr, add --clip_grad 1.0, or train without --fp16")
            if state.on_log is not None:
                values = {"loss": window_loss / window_seen, "acc1": window_correct / window_seen, "lr": lr,
                          "images_per_s": window_seen * world_size() / max(now - last_log, 1e-9)}
                if grad_count:
                    values["grad_norm"] = grad_sum / grad_count  # mean over the optimizer steps since the last point
                state.on_log(state.step, values)
            window.zero_()
            grad_window.zero_()
            window_seen, last_log = 0, now
            elapsed = now - start
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", lr=f"{lr:.2e}",
                            img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)
    return {"train_loss": loss_sum / max(seen, 1), "train_acc1": correct / max(seen, 1), "lr": lr,
            "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9), "stopped": None,
            "progress": EpochProgress(num_batches, num_batches, loss_sum, correct, int(seen), seconds, lr, [])}
