"""Numeric precision and memory format: what the CPU or GPU can do fast, and the autocast context built once.

bf16 autocast pays only where the hardware has native bf16 arithmetic (CUDA GPUs from Ampere on; CPUs with
AVX-512 BF16 or AMX); elsewhere PyTorch emulates it and a training step runs several times SLOWER than fp32
(measured on an AMD EPYC with AVX2 only: ResNet18 at 224 px, 0.7 img/s in bf16 against 9.1 in fp32, both
channels_last). `cpu_bf16_native` asks oneDNN, which decides the kernels, instead of parsing /proc/cpuinfo.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass

import torch

AMP_DTYPES = ("auto", "float16", "bfloat16")


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo), e.g. 'AMD EPYC 9B14'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_capability() -> str:
    """The SIMD level PyTorch dispatches its CPU kernels to: DEFAULT, AVX2, AVX512, ..."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_bf16_native() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_native()


def autocast_dtype(device: torch.device, amp_dtype: str = "auto") -> torch.dtype:
    """--amp_dtype auto: float16 on CUDA (with a GradScaler), bfloat16 on CPU."""
    if amp_dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return getattr(torch, amp_dtype)


def autocast(device: torch.device, enabled: bool, amp_dtype: str = "auto"):
    """The autocast context for `device` (a null context when disabled). Cheap to enter many times."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device, amp_dtype))


def needs_grad_scaler(device: torch.device, enabled: bool, amp_dtype: str = "auto") -> bool:
    """float16 autocast on CUDA needs loss scaling; bfloat16 has float32's exponent range and does not."""
    return enabled and device.type == "cuda" and autocast_dtype(device, amp_dtype) == torch.float16


@dataclass(frozen=True)
class Precision:
    """What will run: autocast on or off, its dtype, and the memory format, with the reason for any change."""

    amp: bool
    amp_dtype: str  # float16 / bfloat16 when amp, "float32" otherwise
    channels_last: bool
    note: str | None = None  # a one-line warning when the request was changed

    def describe(self) -> str:
        kind = f"{self.amp_dtype} autocast (mixed precision)" if self.amp else "float32"
        return f"{kind}, {'channels_last (NHWC)' if self.channels_last else 'NCHW'} memory format"


def resolve_precision(device: torch.device, fp16: bool, amp_dtype: str = "auto", channels_last: bool = False) -> Precision:
    """--fp16 / --amp_dtype / --channels_last as they will really run on `device`.

    On a CPU without native bf16, `--fp16` (which means bfloat16 autocast on CPUs) falls back to float32: emulated
    bf16 is several times slower than float32 there. An explicit `--amp_dtype bfloat16` still forces it.
    """
    if not fp16:
        return Precision(False, "float32", channels_last)
    dtype = str(autocast_dtype(device, amp_dtype)).removeprefix("torch.")
    if device.type == "cpu" and dtype == "bfloat16" and amp_dtype == "auto" and not cpu_bf16_native():
        note = (f"--fp16: this CPU ({cpu_model()}, {cpu_capability()}) has no native bfloat16 (AVX-512 BF16 or AMX), where "
                "bf16 autocast runs several times slower than float32; training in float32 instead "
                "(--amp_dtype bfloat16 forces bf16)")
        return Precision(False, "float32", channels_last, note)
    return Precision(True, dtype, channels_last)
