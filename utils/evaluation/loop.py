"""The eval loop, written once: validation during training, eval.py on checkpoints and exported artifacts, quantize.py."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from tqdm import tqdm

from utils.distributed import all_reduce_sum, is_main_process
from utils.precision import autocast

TTA_CHOICES = ("none", "flip")


def progress(iterable, enabled: bool, **kwargs):
    """tqdm bar only on rank 0, on a terminal, and when not asked to be quiet."""
    return tqdm(iterable, disable=not (enabled and is_main_process() and sys.stderr.isatty()),
                dynamic_ncols=True, leave=False, **kwargs)


@torch.no_grad()
def evaluate(model: nn.Module | None, loader, device: torch.device, num_classes: int, *, criterion: nn.Module | None = None,
             amp: bool = False, amp_dtype: str = "auto", channels_last: bool = False, show_progress: bool = True,
             forward: Callable[[torch.Tensor], torch.Tensor] | None = None, desc: str = "val",
             return_predictions: bool = False, tta: str = "none") -> dict:
    """Mean loss over the whole set, acc@1, acc@5 (capped at num_classes) and the confusion matrix.

    Metrics are summed over processes under torchrun. `forward` replaces `model(images)` for
    engines that are not nn.Modules (ONNX Runtime, TorchScript on another device, ...).
    tta="flip": the logits are the mean of the image's and its horizontal mirror's (test-time augmentation).
    """
    if tta not in TTA_CHOICES:
        raise ValueError(f"unknown tta {tta!r}: choose from {', '.join(TTA_CHOICES)}")
    if model is not None:
        model.eval()
    criterion = criterion or nn.CrossEntropyLoss()
    top5 = min(5, num_classes)
    acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
    acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro").to(device)
    confusion = MulticlassConfusionMatrix(num_classes).to(device)
    amp_context = autocast(device, amp, amp_dtype)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no host sync per batch
    seen, predictions = 0, []
    for images, targets in progress(loader, show_progress, desc=desc):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp_context:
            logits = (forward(images) if forward is not None else model(images)).float()
            if tta == "flip":
                mirrored = images.flip(-1)
                if channels_last:
                    mirrored = mirrored.contiguous(memory_format=torch.channels_last)
                logits = (logits + (forward(mirrored) if forward is not None else model(mirrored)).float()) / 2
        loss_sum += criterion(logits, targets).double() * targets.shape[0]
        seen += targets.shape[0]
        acc1.update(logits, targets)
        acc5.update(logits, targets)
        confusion.update(logits, targets)
        if return_predictions:
            predictions.append(logits.argmax(1).cpu())
    loss_sum, seen = all_reduce_sum([loss_sum.item(), seen], device)
    cm = confusion.compute().cpu()
    out = {"loss": loss_sum / max(seen, 1), "acc1": acc1.compute().item(), "acc5": acc5.compute().item(),
           "num_images": int(seen), "confusion_matrix": cm}
    if return_predictions:
        out["predictions"] = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    return out


def per_class_accuracy(confusion: torch.Tensor, classes: list[str]) -> dict[str, float]:
    totals = confusion.sum(1).clamp(min=1)
    return {c: float(confusion[i, i] / totals[i]) for i, c in enumerate(classes)}
