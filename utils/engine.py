"""The training loop and the eval loop, written once and used by train.py, eval.py and the tests."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from tqdm import tqdm

from utils.distributed import all_reduce_sum, is_main_process


def autocast_context(device: torch.device, enabled: bool, dtype: str = "auto"):
    """fp16 autocast on CUDA (with a GradScaler), bf16 on CPU; a null context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    if dtype == "auto":
        dtype = "float16" if device.type == "cuda" else "bfloat16"
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def progress(iterable, enabled: bool, **kwargs):
    """tqdm bar only on rank 0, on a terminal, and when not asked to be quiet."""
    return tqdm(iterable, disable=not (enabled and is_main_process() and sys.stderr.isatty()),
                dynamic_ncols=True, leave=False, **kwargs)


@dataclass
class TrainState:
    """What the loop needs besides the model and data; `step` counts optimizer steps over the whole run."""

    optimizer: torch.optim.Optimizer
    schedule: object
    scaler: torch.amp.GradScaler | None = None
    ema: object | None = None
    step: int = 0
    accumulation: int = 1
    clip_grad: float = 0.0
    amp: bool = False
    amp_dtype: str = "auto"
    channels_last: bool = False
    log_every: int = 50
    on_log: object = None  # callable(step, {"loss": .., "acc1": .., "lr": ..})
    history: list = field(default_factory=list)


def _step(model: nn.Module, state: TrainState) -> float:
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    if state.clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), state.clip_grad)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(model)
    state.step += 1
    return state.optimizer.param_groups[0]["lr"]


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, state: TrainState, device: torch.device,
                    epoch: int, show_progress: bool = True) -> dict:
    """One pass over `loader`; the optimizer steps every `accumulation` micro-batches and after the last one.

    Each micro-batch's mean loss is divided by the number of micro-batches in its window, so k
    micro-batches of b samples give the gradient of one batch of k*b samples.
    """
    model.train()
    num_batches = len(loader)
    k = max(1, state.accumulation)
    loss_sum, correct, seen, window_loss, window_correct, window_seen = 0.0, 0, 0, 0.0, 0, 0
    start = time.perf_counter()
    lr = state.schedule.set(state.step)
    bar = progress(loader, show_progress, total=num_batches, desc=f"epoch {epoch}")
    state.optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if state.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        window_start = (i // k) * k
        window_len = min(k, num_batches - window_start)
        last_in_window = i == window_start + window_len - 1
        sync = contextlib.nullcontext() if last_in_window or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast_context(device, state.amp, state.amp_dtype):
                logits = model(images)
                loss = criterion(logits, targets)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} batch {i}: lower --base_lr or use --clip_grad")
            scaled = loss / window_len
            (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
        if last_in_window:
            _step(model, state)
            lr = state.schedule.set(state.step) if state.step < state.schedule.total_steps else lr
        n = targets.numel()
        batch_correct = (logits.argmax(1) == targets).sum().item()
        loss_sum += loss.item() * n
        correct += batch_correct
        seen += n
        window_loss += loss.item() * n
        window_correct += batch_correct
        window_seen += n
        if (i + 1) % state.log_every == 0 or i + 1 == num_batches:
            if state.on_log is not None:
                state.on_log(state.step, {"loss": window_loss / window_seen, "acc1": window_correct / window_seen, "lr": lr})
            window_loss, window_correct, window_seen = 0.0, 0, 0
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", lr=f"{lr:.2e}",
                        img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)
    return {"train_loss": loss_sum / max(seen, 1), "train_acc1": correct / max(seen, 1), "lr": lr,
            "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, num_classes: int, criterion: nn.Module | None = None,
             amp: bool = False, amp_dtype: str = "auto", channels_last: bool = False, show_progress: bool = True,
             forward=None, desc: str = "val", return_predictions: bool = False) -> dict:
    """Mean loss over the whole set, acc@1, acc@5 (capped at num_classes) and the confusion matrix.

    Metrics are summed over processes under torchrun. `forward` replaces `model(images)` for
    engines that are not nn.Modules (ONNX Runtime, TorchScript on another device, ...).
    """
    if model is not None:
        model.eval()
    criterion = criterion or nn.CrossEntropyLoss()
    top5 = min(5, num_classes)
    acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
    acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro").to(device)
    confusion = MulticlassConfusionMatrix(num_classes).to(device)
    loss_sum, seen, predictions = 0.0, 0, []
    for images, targets in progress(loader, show_progress, desc=desc):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp, amp_dtype):
            logits = forward(images) if forward is not None else model(images)
        logits = logits.float()
        loss_sum += criterion(logits, targets).item() * targets.numel()
        seen += targets.numel()
        acc1.update(logits, targets)
        acc5.update(logits, targets)
        confusion.update(logits, targets)
        if return_predictions:
            predictions.append(logits.argmax(1).cpu())
    loss_sum, seen = all_reduce_sum([loss_sum, seen], device)
    cm = confusion.compute().cpu()
    out = {"loss": loss_sum / max(seen, 1), "acc1": acc1.compute().item(), "acc5": acc5.compute().item(),
           "num_images": int(seen), "confusion_matrix": cm}
    if return_predictions:
        out["predictions"] = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    return out


def per_class_accuracy(confusion: torch.Tensor, classes: list[str]) -> dict[str, float]:
    totals = confusion.sum(1).clamp(min=1)
    return {c: float(confusion[i, i] / totals[i]) for i, c in enumerate(classes)}
