"""The eval loop, written once: validation during training, eval.py on checkpoints and exported artifacts, quantize.py.

Besides the metrics it can collect, in the same pass and on the device, what a dashboard shows: per-class
precision-recall counts (`pr_thresholds`) and the first misclassified images (`keep_mistakes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from utils.distributed import all_reduce_sum, all_reduce_sum_, is_main_process
from utils.precision import autocast
from utils.progress import bar

TTA_CHOICES = ("none", "flip")


def progress(iterable, enabled: bool, **kwargs):
    """A bar (utils.progress) only on rank 0."""
    return bar(iterable, enabled=enabled and is_main_process(), leave=False, **kwargs)


@dataclass
class PRCurves:
    """Per-class precision-recall curves at `num_thresholds` thresholds k / (num_thresholds - 1); every array is
    (num_classes, num_thresholds): counts of true/false positives/negatives for `probability >= threshold`."""

    tp: np.ndarray
    fp: np.ndarray
    tn: np.ndarray
    fn: np.ndarray
    precision: np.ndarray
    recall: np.ndarray

    @property
    def num_thresholds(self) -> int:
        return self.tp.shape[1]


class PRCounter:
    """Per-class histograms of the softmax probability, binned as TensorBoard's pr_curve summary bins them
    (bucket floor(p * (T - 1))): constant memory whatever the set size, no host sync, summed over processes."""

    def __init__(self, num_classes: int, num_thresholds: int, device: torch.device):
        self.num_classes, self.num_thresholds = num_classes, num_thresholds
        self.hist = torch.zeros(2, num_classes * num_thresholds, dtype=torch.float64, device=device)  # positives, negatives
        self.offsets = torch.arange(num_classes, device=device) * num_thresholds

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        bucket = (probs.float() * (self.num_thresholds - 1)).floor().long().clamp_(0, self.num_thresholds - 1)
        index = (bucket + self.offsets).flatten()
        positive = nn.functional.one_hot(targets.long(), self.num_classes).flatten().double()
        self.hist[0].scatter_add_(0, index, positive)
        self.hist[1].scatter_add_(0, index, 1.0 - positive)

    def compute(self) -> PRCurves:
        """TensorBoard's formulas (tensorboard.plugins.pr_curve): counts at or above each threshold."""
        hist = all_reduce_sum_(self.hist.clone()).view(2, self.num_classes, self.num_thresholds).cpu().numpy()
        tp, fp = (np.cumsum(h[:, ::-1], axis=1)[:, ::-1] for h in hist)
        tn, fn = fp[:, :1] - fp, tp[:, :1] - tp
        return PRCurves(tp, fp, tn, fn, tp / np.maximum(1e-7, tp + fp), tp / np.maximum(1e-7, tp + fn))


@dataclass
class Mistakes:
    """Misclassified images as the network received them (normalised CHW, CPU) with their labels."""

    images: torch.Tensor
    targets: torch.Tensor
    predictions: torch.Tensor
    confidence: torch.Tensor  # softmax probability of the predicted class


class MistakeBuffer:
    """The first `limit` misclassified images in loader order, kept on the device: each wrong image is copied to its
    slot (a running count decides it), every other image to a spare slot, so no batch waits for the host.
    Under torchrun each process keeps its own shard's mistakes."""

    def __init__(self, limit: int):
        self.limit, self.slots, self.count = limit, None, None

    def update(self, images: torch.Tensor, targets: torch.Tensor, probs: torch.Tensor) -> None:
        confidence, predictions = probs.max(1)
        if self.slots is None:
            n, device = self.limit + 1, images.device
            self.slots = Mistakes(images.new_zeros((n, *images.shape[1:]), dtype=torch.float32),
                                  torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.long, device=device),
                                  torch.zeros(n, device=device))
            self.count = torch.zeros((), dtype=torch.long, device=device)
        wrong = predictions != targets
        slot = self.count + wrong.long().cumsum(0) - 1
        slot = torch.where(wrong & (slot < self.limit), slot, self.limit)
        for buffer, values in ((self.slots.images, images.float()), (self.slots.targets, targets.long()),
                               (self.slots.predictions, predictions), (self.slots.confidence, confidence.float())):
            buffer.index_copy_(0, slot, values)
        self.count += wrong.sum()

    def compute(self) -> Mistakes:
        if self.slots is None:
            return Mistakes(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
        n = min(int(self.count), self.limit)
        return Mistakes(*(t[:n].cpu() for t in (self.slots.images, self.slots.targets, self.slots.predictions,
                                                 self.slots.confidence)))


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: metrics over the whole set (summed over processes under torchrun), per-class tensors on the
    CPU, and what was asked for besides (predictions, PR curves, mistakes; speed, filled by artifacts.evaluate_loaded)."""

    loss: float
    acc1: float
    acc5: float  # top-min(5, classes)
    num_images: int
    confusion_matrix: torch.Tensor  # (classes, classes) int64: rows true class, columns predicted
    precision: torch.Tensor  # (classes,) per class, torchmetrics' MulticlassPrecision(average=None)
    recall: torch.Tensor
    f1: torch.Tensor
    nonfinite: int = 0  # images whose outputs hold NaN or inf (their argmax, and so acc@1, means nothing)
    predictions: torch.Tensor | None = None  # argmax per image in loader order (return_predictions)
    pr_curves: PRCurves | None = None  # pr_thresholds > 0
    mistakes: Mistakes | None = None  # keep_mistakes > 0
    logits: torch.Tensor | None = None  # (images, classes) float32 on the CPU, in loader order (keep_logits)
    targets: torch.Tensor | None = None  # (images,) with keep_logits
    latency_ms: float | None = None  # batch 1
    throughput_img_s: float | None = None
    speed_batch_size: int | None = None

    def speed(self) -> dict[str, float | int]:
        """latency_ms, throughput_img_s and speed_batch_size when they were measured (the reports' fields)."""
        return {key: getattr(self, key) for key in ("latency_ms", "throughput_img_s", "speed_batch_size")
                if getattr(self, key) is not None}


@torch.no_grad()
def evaluate(model: nn.Module | None, loader, device: torch.device, num_classes: int, *, criterion: nn.Module | None = None,
             amp: bool = False, amp_dtype: str = "auto", channels_last: bool = False, show_progress: bool = True,
             forward: Callable[[torch.Tensor], torch.Tensor] | None = None, desc: str = "val",
             return_predictions: bool = False, tta: str = "none", pr_thresholds: int = 0, keep_mistakes: int = 0,
             keep_logits: bool = False) -> EvalResult:
    """Mean loss over the whole set, acc@1, acc@5 (capped at num_classes), the confusion matrix and the number of
    images whose outputs were not finite (`nonfinite`: a NaN model otherwise scores the share of class 0 as acc@1).

    Metrics are summed over processes under torchrun. `forward` replaces `model(images)` for
    engines that are not nn.Modules (ONNX Runtime, TorchScript on another device, ...).
    tta="flip": the logits are the mean of the image's and its horizontal mirror's (test-time augmentation).
    pr_thresholds > 0 fills pr_curves (PRCurves); keep_mistakes > 0 fills mistakes (Mistakes, at most that many);
    keep_logits fills logits and targets (this process's images; (images x classes) floats in memory: eval.py's
    calibration and highest-loss images need them).
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
    # per class (average=None); class_metrics() derives the macro and weighted averages and balanced accuracy
    per_class = {name: cls(num_classes, average=None).to(device) for name, cls in
                 (("precision", MulticlassPrecision), ("recall", MulticlassRecall), ("f1", MulticlassF1Score))}
    amp_context = autocast(device, amp, amp_dtype)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no host sync per batch
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    seen, predictions, kept = 0, [], []
    pr = PRCounter(num_classes, pr_thresholds, device) if pr_thresholds > 0 else None
    mistakes = MistakeBuffer(keep_mistakes) if keep_mistakes > 0 else None
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
        nonfinite += (~torch.isfinite(logits)).any(1).sum()
        seen += targets.shape[0]
        acc1.update(logits, targets)
        acc5.update(logits, targets)
        confusion.update(logits, targets)
        for metric in per_class.values():
            metric.update(logits, targets)
        if return_predictions:
            predictions.append(logits.argmax(1).cpu())
        if keep_logits:
            kept.append((logits.cpu(), targets.cpu()))
        if pr is not None or mistakes is not None:
            probs = logits.softmax(1)
            if pr is not None:
                pr.update(probs, targets)
            if mistakes is not None:
                mistakes.update(images, targets, probs)
    loss_sum, seen, nonfinite = all_reduce_sum([loss_sum.item(), seen, nonfinite.item()], device)
    cm = confusion.compute().cpu()
    return EvalResult(
        loss=loss_sum / max(seen, 1), acc1=acc1.compute().item(), acc5=acc5.compute().item(), num_images=int(seen),
        nonfinite=int(nonfinite),
        confusion_matrix=cm, **{name: metric.compute().cpu() for name, metric in per_class.items()},
        predictions=(torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)) if return_predictions else None,
        pr_curves=pr.compute() if pr is not None else None, mistakes=mistakes.compute() if mistakes is not None else None,
        **({"logits": torch.cat([lg for lg, _ in kept]) if kept else torch.zeros(0, num_classes),
            "targets": torch.cat([t for _, t in kept]) if kept else torch.zeros(0, dtype=torch.long)} if keep_logits else {}))


def per_class_accuracy(confusion: torch.Tensor, classes: list[str]) -> dict[str, float]:
    """Recall of each true class (rows of the confusion matrix), 0 for a class without images."""
    totals = confusion.sum(1).clamp(min=1)
    return {c: float(confusion[i, i] / totals[i]) for i, c in enumerate(classes)}


def per_class_precision(confusion: torch.Tensor, classes: list[str]) -> dict[str, float]:
    """Share of each class's predictions that were right (columns of the confusion matrix), 0 if never predicted."""
    totals = confusion.sum(0).clamp(min=1)
    return {c: float(confusion[i, i] / totals[i]) for i, c in enumerate(classes)}


def class_metrics(stats: EvalResult, classes: list[str]) -> dict:
    """Per-class precision, recall and F1 (torchmetrics, from the eval loop), their macro average (each class counts
    once) and weighted average (each class by its number of images), and balanced accuracy (the mean recall over the
    classes that have images, as scikit-learn defines it). Recall of a class is its per-class accuracy."""
    support = stats.confusion_matrix.sum(1).double()
    weights = support / support.sum().clamp(min=1)
    out = {"support": {c: int(n) for c, n in zip(classes, support.tolist())}}
    for name in ("precision", "recall", "f1"):
        values = getattr(stats, name).double()
        out[name] = {c: float(v) for c, v in zip(classes, values.tolist())}
        out[f"{name}_macro"] = float(values.mean())
        out[f"{name}_weighted"] = float((values * weights).sum())
    present = support > 0
    out["balanced_accuracy"] = float(stats.recall.double()[present].mean()) if present.any() else 0.0
    return out
