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
from dataclasses import dataclass

import torch
from torch import nn

from utils.distributed import all_reduce_sum
from utils.evaluation.loop import progress
from utils.precision import autocast


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
    on_log: Callable[[int, dict], None] | None = None  # (step, {"loss", "acc1", "lr"}) at every log point
    mix: Callable | None = None  # (images, int targets) -> (mixed images, soft targets): Mixup/CutMix on the batch

    def __post_init__(self):
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda", enabled=False)

    def shown_lr(self, previous: float) -> float:
        """The LR to report: the next step's, or after the run's last step the one that step used."""
        return self.optimizer.param_groups[0]["lr"] if self.step < self.scheduler.total_steps else previous


def optimizer_step(model: nn.Module, state: TrainState) -> None:
    """Unscale, clip, step (skipped by the scaler on inf/NaN gradients), zero, update the EMA, advance the LR."""
    state.scaler.unscale_(state.optimizer)
    if state.clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), state.clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(model)
    state.step += 1
    state.scheduler.step()


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, state: TrainState, device: torch.device,
                    epoch: int, show_progress: bool = True) -> dict:
    """One pass over `loader`; the optimizer steps every `accumulation` micro-batches and after the last one.

    Each micro-batch's mean loss is divided by the number of micro-batches in its window, so k
    micro-batches of b samples give the gradient of one batch of k*b samples. With `state.mix` (Mixup/CutMix) the
    loss is the cross-entropy against the soft targets, and train acc@1 counts predictions equal to the label with
    the larger mixing weight.
    """
    model.train()
    num_batches = len(loader)
    k = max(1, state.accumulation)
    amp = autocast(device, state.amp, state.amp_dtype)
    # [loss sum, correct] over the epoch and since the last log point, summed on the device in micro-batch order
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    window = torch.zeros(2, dtype=torch.float64, device=device)
    seen = window_seen = 0
    loss_sum = correct = 0.0
    lr = state.optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = progress(loader, show_progress, total=num_batches, desc=f"epoch {epoch}")
    state.optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        labels = targets
        if state.mix is not None:
            images, targets = state.mix(images, targets)
            labels = targets.argmax(1)
        if state.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
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
            optimizer_step(model, state)
            lr = state.shown_lr(lr)
        n = labels.shape[0]
        batch = torch.stack([loss.detach().double() * n, (logits.detach().argmax(1) == labels).sum().double()])
        totals += batch
        window += batch
        seen += n
        window_seen += n
        if (i + 1) % state.log_every == 0 or i + 1 == num_batches:
            loss_sum, correct, window_loss, window_correct = torch.cat([totals, window]).tolist()  # the one host sync
            if not math.isfinite(window_loss):
                raise FloatingPointError(f"the training loss became {window_loss / window_seen:g} in epoch {epoch} "
                                         f"(by batch {i + 1} of {num_batches}): lower --base_lr, add --clip_grad 1.0, "
                                         "or train without --fp16")
            if state.on_log is not None:
                state.on_log(state.step, {"loss": window_loss / window_seen, "acc1": window_correct / window_seen, "lr": lr})
            window.zero_()
            window_seen = 0
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", lr=f"{lr:.2e}",
                            img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)
    return {"train_loss": loss_sum / max(seen, 1), "train_acc1": correct / max(seen, 1), "lr": lr,
            "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
