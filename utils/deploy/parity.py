"""Proof that an exported artifact computes what the PyTorch model computes: random and real input batches, the
maximum logit difference with a tolerance that fits the precision, and top-1 agreement."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.data.preprocess import Preprocess, list_images, preprocess_file
from utils.errors import InputError

FP32_ATOL = 1e-4  # FP32: max |diff| <= max(FP32_ATOL, FP32_RTOL * largest |reference logit|)
FP32_RTOL = 1e-5  # (float32 holds ~7 significant digits: logits of 1e4 cannot agree to 1e-4 absolute)
FP16_RTOL = 2e-2  # FP16: max |diff| <= FP16_RTOL * max(1, largest |reference logit|)
RANDOM_BATCH_SIZES = (1, 7)
REAL_IMAGE_COUNT = 16


class ParityError(Exception):
    """The exported artifact does not reproduce the PyTorch model (export.py exits 1)."""


def probe_size(pre: Preprocess) -> int:
    """A second input side (1.5x the training size) used to test and check dynamic H/W."""
    return int(round(pre.img_size * 1.5))


def supports_dynamic_size(model: nn.Module, pre: Preprocess) -> bool:
    """True when the network runs at another H/W (fully convolutional or global-pooled), False if fixed-size layers fail."""
    x = torch.zeros(1, pre.channels, probe_size(pre), probe_size(pre))
    try:
        with torch.inference_mode():
            model(x)
    except RuntimeError:
        return False
    return True


def random_batches(pre: Preprocess, dynamic_size: bool, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Standard-normal batches (the range normalised images live in) at batch sizes 1 and 7, and another H/W if dynamic."""
    rng = np.random.default_rng(seed)
    s = pre.img_size
    out = [(f"random batch {n}x{pre.channels}x{s}x{s}", rng.standard_normal((n, pre.channels, s, s)).astype(np.float32))
           for n in RANDOM_BATCH_SIZES]
    if dynamic_size:
        s2 = probe_size(pre)
        out.append((f"random batch 2x{pre.channels}x{s2}x{s2} (dynamic H/W)",
                    rng.standard_normal((2, pre.channels, s2, s2)).astype(np.float32)))
    return out


def _fashion_mnist_test_present(data_root: Path) -> bool:
    raw = data_root / "FashionMNIST" / "raw"
    return any((raw / f).is_file() for f in ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"))


def real_images(pre: Preprocess, image_spec: list[str] | None = None, train_args: dict | None = None,
                count: int = REAL_IMAGE_COUNT) -> tuple[str, np.ndarray] | None:
    """Up to `count` real images through the shared eval transform: from `image_spec`, else from the
    validation data the checkpoint was trained on (when it is still on disk). None if neither exists."""
    if image_spec:
        paths = list_images(image_spec)[:count]
        if not paths:
            raise InputError(f"--parity_images {' '.join(image_spec)}: no images found")
        return f"{len(paths)} real images from {' '.join(image_spec)}", np.stack([preprocess_file(p, pre) for p in paths])
    args = train_args or {}
    dataset, data_root = args.get("dataset"), Path(args.get("data_root") or "data")
    if dataset:
        from utils.data.datasets import val_folder

        val = val_folder(dataset)
        paths = list_images(val)[:count] if val.is_dir() else []
        if paths:
            return f"{len(paths)} real images from {val}", np.stack([preprocess_file(p, pre) for p in paths])
        return None
    if _fashion_mnist_test_present(data_root):
        from utils.data.datasets import EvalTransform
        from utils.data.fashion_mnist import fashion_mnist

        ds = fashion_mnist(data_root, False, EvalTransform(pre))
        n = min(count, len(ds))
        return (f"{n} real Fashion-MNIST test images from {data_root}",
                np.stack([ds[i][0].numpy() for i in range(n)]))
    return None


@dataclass
class ParityReport:
    tolerance: float
    scale: float  # largest |logit| of the reference
    checks: list[tuple[str, float, float]] = field(default_factory=list)  # (label, max abs diff, top-1 agreement)

    @property
    def max_abs_diff(self) -> float:
        return max((d for _, d, _ in self.checks), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def lines(self) -> list[str]:
        return [f"  {label}: max |diff| {d:.3g}, top-1 agreement {100 * a:.1f}%" for label, d, a in self.checks]


def tolerance_for(precision: str, reference_scale: float, atol: float = FP32_ATOL, rtol: float = FP32_RTOL) -> float:
    """FP32: `atol`, or `rtol` of the largest logit when that is larger; FP16: FP16_RTOL of max(1, largest logit)."""
    if precision == "fp32":
        return max(atol, rtol * reference_scale)
    return FP16_RTOL * max(1.0, reference_scale)


def describe_tolerance(precision: str, report: ParityReport, atol: float, rtol: float) -> str:
    if precision == "fp32":
        return f"{report.tolerance:.3g} = max(atol {atol:g}, rtol {rtol:g} x largest |logit| {report.scale:.3g})"
    return f"{report.tolerance:.3g} = {FP16_RTOL:g} x max(1, largest |logit| {report.scale:.3g})"


def reference_outputs(reference: Callable[[np.ndarray], np.ndarray], batches: list[tuple[str, np.ndarray]],
                      source: str) -> list[np.ndarray]:
    """The PyTorch model's outputs on every batch, refused (InputError, before anything is exported) when they hold
    NaN or inf: such a model has no outputs to match, and the parity check would only say it "differs by nan"."""
    outputs = []
    for label, x in batches:
        ref = np.asarray(reference(x), dtype=np.float32)
        if not np.isfinite(ref).all():
            raise InputError(f"{source}: the PyTorch model's outputs are NaN or infinite (on the {label}): its weights are "
                             "broken, e.g. by a diverged training run; nothing exported: export a checkpoint from before "
                             "it diverged, or retrain (e.g. with a lower --base_lr)")
        outputs.append(ref)
    return outputs


def check_parity(expected: list[np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                 batches: list[tuple[str, np.ndarray]], precision: str = "fp32", atol: float = FP32_ATOL,
                 rtol: float = FP32_RTOL) -> ParityReport:
    """Run the candidate on every batch against the reference's outputs (`expected`, from reference_outputs); max
    absolute difference of the raw outputs and top-1 agreement per batch. NaN or inf where the reference is finite is
    a ParityError of its own (a max difference of nan compares as passing nothing, and says nothing)."""
    results, scale = [], 0.0
    for (label, x), ref in zip(batches, expected, strict=True):
        out = np.asarray(candidate(x), dtype=np.float32)
        if ref.shape != out.shape:
            raise ParityError(f"{label}: output shape {out.shape} differs from PyTorch's {ref.shape}")
        if not np.isfinite(out).all():
            raise ParityError(f"{label}: the exported model's outputs are NaN or infinite where PyTorch's are finite")
        scale = max(scale, float(np.abs(ref).max()))
        agree = float((ref.reshape(len(ref), ref.shape[1], -1).mean(-1).argmax(1)
                       == out.reshape(len(out), out.shape[1], -1).mean(-1).argmax(1)).mean())
        results.append((label, float(np.abs(ref - out).max()), agree))
    return ParityReport(tolerance_for(precision, scale, atol, rtol), scale, results)


def torch_forward(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()
    return forward
