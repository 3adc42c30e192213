"""Are the probabilities honest? Expected calibration error with its bins, the reliability diagram, one temperature
fitted on held-out logits (temperature scaling, Guo et al. 2017), and the class pairs the network confuses most.

ECE is torchmetrics' MulticlassCalibrationError (15 bins, L1): the mean over bins, weighted by their share of the
images, of |accuracy - mean confidence|, where confidence is the top-1 probability. The bins are computed here the way
torchmetrics bins (torch.bucketize over linspace(0, 1, 16), right=True), so they reproduce its number; confidences of
exactly 1.0 (float32 softmax saturates) fall in torchmetrics' own extra bin [1, 1], listed when it holds images.

Temperature scaling divides every logit by one T > 0, fitted by LBFGS on the negative log-likelihood: probabilities
change, the order of the classes (top-1, top-5, accuracy) never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics.classification import MulticlassCalibrationError

from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import InputError
from utils.evaluation.loop import Mistakes
from utils.plots import plt

CALIBRATION_BINS = 15


@dataclass(frozen=True)
class Calibration:
    """ECE and NLL of logits / temperature, and the bins: (low, high, mean confidence, accuracy, images)."""

    ece: float
    nll: float
    temperature: float
    bins: tuple[dict, ...]

    def to_dict(self) -> dict:
        return {"ece": self.ece, "nll": self.nll, "temperature": self.temperature, "n_bins": CALIBRATION_BINS,
                "bins": list(self.bins)}


def calibration(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                n_bins: int = CALIBRATION_BINS) -> Calibration:
    """The calibration of (N, classes) logits divided by `temperature` against (N,) class indices."""
    logits = logits.detach().float() / temperature
    targets = targets.detach().long()
    probs = logits.softmax(1)
    metric = MulticlassCalibrationError(logits.shape[1], n_bins=n_bins, norm="l1")
    ece = float(metric(probs, targets))
    nll = float(torch.nn.functional.cross_entropy(logits, targets))
    confidence, predicted = probs.max(1)
    correct = (predicted == targets).float()
    index = torch.bucketize(confidence, torch.linspace(0, 1, n_bins + 1), right=True) - 1  # torchmetrics' binning
    bins = []
    for k in range(n_bins + 1):
        inside = index == k
        count = int(inside.sum())
        if k == n_bins and count == 0:
            continue
        low, high = (k / n_bins, (k + 1) / n_bins) if k < n_bins else (1.0, 1.0)
        bins.append({"low": round(low, 6), "high": round(high, 6), "count": count,
                     "confidence": float(confidence[inside].mean()) if count else None,
                     "accuracy": float(correct[inside].mean()) if count else None})
    return Calibration(ece, nll, float(temperature), tuple(bins))


def bins_ece(bins) -> float:
    """ECE from the bins alone: sum over bins of (images / total) x |accuracy - confidence|."""
    total = sum(b["count"] for b in bins)
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) (LBFGS on log T, so T stays positive)."""
    logits = logits.detach().float().clone()  # a plain tensor even when the eval loop ran under inference_mode
    targets = targets.detach().long().clone()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


def reliability_figure(cal: Calibration, title: str = "", before: Calibration | None = None):
    """Accuracy per confidence bin against the diagonal (a perfectly calibrated network), the gap shaded, and how
    many images each bin holds; `before` (the uncalibrated bins) drawn as outlines."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": (3, 1)}, sharex=True)
    width = 1.0 / CALIBRATION_BINS

    def draw(c: Calibration, **style):
        shown = [b for b in c.bins if b["count"] and b["high"] > b["low"]]
        ax.bar([b["low"] for b in shown], [b["accuracy"] for b in shown], width=width, align="edge", **style)
        return shown

    if before is not None:
        draw(before, fill=False, edgecolor="gray", linestyle="--", label=f"before: ECE {before.ece:.4f}")
    shown = draw(cal, color="tab:blue", alpha=0.8, edgecolor="black",
                 label=f"{'after' if before else 'accuracy'}: ECE {cal.ece:.4f}" + (f" (T = {cal.temperature:.3f})"
                                                                                   if cal.temperature != 1 else ""))
    for b in shown:  # the gap between mean confidence and accuracy
        ax.plot([b["low"] + width / 2] * 2, [b["accuracy"], b["confidence"]], color="tab:red", linewidth=2)
    ax.plot([0, 1], [0, 1], color="black", linewidth=1, linestyle=":", label="perfect calibration")
    ax.plot([], [], color="tab:red", linewidth=2, label="gap to mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} reliability ({CALIBRATION_BINS} bins)".strip())
    ax.legend(fontsize=8, loc="upper left")
    hist.bar([b["low"] for b in cal.bins if b["high"] > b["low"]], [b["count"] for b in cal.bins if b["high"] > b["low"]],
             width=width, align="edge", color="gray")
    hist.set_yscale("symlog")
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    fig.tight_layout()
    return fig


def confused_pairs(cm: np.ndarray, classes: list[str], k: int = 10) -> list[dict]:
    """The k (true, predicted) pairs of different classes with the most images, most first (ties: class order):
    count, and rate = count / images of the true class."""
    cm = np.asarray(cm)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    support = cm.sum(1)
    out = []
    for i, j in zip(*np.unravel_index(flat, cm.shape)):
        if off[i, j] == 0:
            break
        out.append({"true": classes[i], "predicted": classes[j], "count": int(off[i, j]),
                    "rate": float(off[i, j] / max(1, support[i]))})
    return out


def highest_loss(logits: torch.Tensor, targets: torch.Tensor, k: int, wrong_only: bool = True) -> torch.Tensor:
    """Indices of the k images with the highest cross-entropy (the most confident mistakes), highest first."""
    losses = torch.nn.functional.cross_entropy(logits.float(), targets.long(), reduction="none")
    if wrong_only:
        losses = torch.where(logits.argmax(1) != targets, losses, torch.tensor(float("-inf")))
    order = losses.argsort(descending=True, stable=True)[:k]
    return order[torch.isfinite(losses[order])]


def highest_loss_mistakes(logits: torch.Tensor, targets: torch.Tensor, dataset, k: int) -> Mistakes:
    """The k misclassified images with the highest loss, as the network received them (read again from `dataset`,
    which the eval loader went through in order)."""
    idx = highest_loss(logits, targets, k)
    if len(idx) == 0:
        return Mistakes(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    confidence, predicted = logits[idx].float().softmax(1).max(1)
    images = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in idx]).float()
    return Mistakes(images, targets[idx].long(), predicted, confidence)


RESUME_KEYS = ("optimizer", "scheduler", "scaler", "partial")  # a calibrated checkpoint is for inference only


def calibrated_path(weights: Path) -> Path:
    return weights.with_name(f"{weights.stem}_calibrated.pth")


def write_calibrated(weights: Path, sha256: str, fitted: Calibration, before: Calibration, dataset: str, split: str,
                     images: int) -> Path:
    """<stem>_calibrated.pth beside `weights`: the same checkpoint (without its resume state) with `temperature` and
    how it was fitted. Never the checkpoint itself; an existing file is replaced only when it was calibrated from
    this same file (a rerun), else refused."""
    out = calibrated_path(weights)
    if out.exists():
        try:
            old = load_checkpoint(out).get("calibration", {}).get("source_sha256")
        except InputError:
            old = None
        if old != sha256:
            raise InputError(f"{out} exists and was not calibrated from {weights}: move it away or calibrate a copy of "
                             f"{weights} under another name")
    ckpt = {k: v for k, v in load_checkpoint(weights).items() if k not in RESUME_KEYS}
    ckpt["temperature"] = fitted.temperature
    ckpt["calibration"] = {"source": weights.name, "source_sha256": sha256, "dataset": dataset, "split": split,
                           "images": images, "method": "temperature scaling, LBFGS on NLL",
                           "ece_before": before.ece, "ece_after": fitted.ece, "nll_before": before.nll,
                           "nll_after": fitted.nll}
    return save_checkpoint(ckpt, out)
