"""Will a batch fit in memory? The memory a network needs for one batch, known before any of it is allocated, and the
allocation failures that still happen turned into one line.

The kernel's OOM killer ends a process that takes more memory than there is without a word and cannot be caught, so
the robust part is an estimate before the first batch: the network runs once on meta tensors (shapes only, no data,
no memory, milliseconds) at the real batch and image size. A training step keeps what autograd saves for the backward
(counted through saved_tensors_hooks) besides the weights' gradients and optimizer state; an inference batch needs
its largest layer's input and output at once. Both are lower bounds: `require_fits` refuses what is sure not to fit,
and `explain_out_of_memory` turns an allocator failure that still happens (torch.OutOfMemoryError, the CPU allocator's
"can't allocate memory", MemoryError, ONNX Runtime's "Failed to allocate memory") into one line naming the flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from models import build_model
from utils.data.tensor_pipeline import available_memory
from utils.errors import InputError

OUT_OF_MEMORY_MARKERS = ("can't allocate memory", "out of memory", "Failed to allocate memory", "std::bad_alloc",
                         "is killed by signal: Killed")


@dataclass(frozen=True)
class BatchMemory:
    """Bytes one batch needs: `fixed` whatever the batch size, plus `per_image` for each image of the batch."""

    what: str  # e.g. "one training step of resnet18"
    batch: int
    fixed: int
    per_image: int
    flags: str  # the flags that chose it, e.g. "--batch_size 64 at --img_size 224"
    other_fix: str  # what to do when not even one image fits

    @property
    def total(self) -> int:
        return self.fixed + self.batch * self.per_image


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n < 2**40 else f"{n / 2**40:.1f} TiB"


def meta_forward(model: nn.Module, batch: int, channels: int, size: int, training: bool) -> tuple[int, int]:
    """Run `model` on a meta batch with meta copies of its weights (torch.func.functional_call: the module's own
    tensors are not touched). Returns (bytes autograd saves for the backward, bytes of the largest input + output of
    one leaf layer)."""
    weights = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad and training)
               for name, t in model.named_parameters()}
    weights.update({name: torch.empty_like(t, device="meta") for name, t in model.named_buffers()})
    ids = {id(t) for t in weights.values()}
    saved, counted, largest = [0], set(), [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in ids and id(t) not in counted:  # a weight is not an activation; one tensor saved twice counts once
            counted.add(id(t))
            saved[0] += t.nelement() * t.element_size()
        return t

    def layer(module: nn.Module, inputs: tuple, output) -> None:
        if next(module.children(), None) is None and isinstance(output, torch.Tensor):
            held = sum(x.nelement() * x.element_size() for x in inputs if isinstance(x, torch.Tensor))
            largest[0] = max(largest[0], held + output.nelement() * output.element_size())

    x = torch.empty(batch, channels, size, size, device="meta")
    hook = nn.modules.module.register_module_forward_hook(layer)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(training):
            functional_call(model, weights, (x,))
    finally:
        hook.remove()
    return saved[0], largest[0]


def training_flags(batch_size: int, img_size: int) -> str:
    return f"--batch_size {batch_size} at --img_size {img_size}"


def training_memory(model_name: str, num_classes: int, kwargs: dict, batch_size: int, images: int,
                    freeze_backbone: bool = False, amp: bool = False) -> BatchMemory | None:
    """What one training step of the network needs at --batch_size (or the `images` of the set, when fewer) at
    kwargs' img_size: the activations autograd keeps (halved under mixed precision; the input batch among them), the
    batch once more as loaded, the weights, and the gradients and at least one optimizer state of the trainable ones.
    The network is built on the meta device (no memory, the RNG untouched). None when it cannot run there."""
    batch = max(1, min(batch_size, images))
    try:
        with torch.device("meta"):
            model = build_model(model_name, num_classes, freeze_backbone=freeze_backbone, **kwargs)
        activations, _ = meta_forward(model.train(), batch, kwargs["in_channels"], kwargs["img_size"], training=True)
    except Exception:  # an op without a meta kernel: no estimate (explain_out_of_memory still catches failures)
        return None
    image = 4 * kwargs["in_channels"] * kwargs["img_size"] ** 2
    weights = sum(t.nelement() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.nelement() * p.element_size() for p in model.parameters() if p.requires_grad)
    return BatchMemory(f"one training step of {model_name}", batch, weights + 2 * trainable,
                       activations // (2 if amp else 1) // batch + image, training_flags(batch_size, kwargs["img_size"]),
                       "lower --img_size")


def inference_memory(model: nn.Module | None, name: str, batch_size: int, images: int, channels: int, size: int,
                     loader_batches: int = 0) -> BatchMemory:
    """What evaluating one batch of --batch_size (or of the `images` of the set, when fewer) needs: the largest
    layer's input and output (for a PyTorch network; other engines are not looked into) and the input batch plus
    `loader_batches` prefetched ones."""
    batch, largest = max(1, min(batch_size, images)), 0
    if model is not None:
        with contextlib.suppress(Exception):  # an op without a meta kernel: the input batches are still counted
            largest = meta_forward(model, batch, channels, size, training=False)[1]
    return BatchMemory(f"evaluating {name}", batch, 0, largest // batch + 4 * channels * size * size * (1 + loader_batches),
                       f"--batch_size {batch_size} (of {size} px images, the model's input size)",
                       "evaluate it on a machine with more memory")


def free_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free where the batch lives, where that is): the GPU's free memory, or what the host can still give this
    process (utils.data.tensor_pipeline.available_memory: MemAvailable, container and ulimit -v limits)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"GPU {device}"
    return available_memory(), "this machine"


def require_fits(need: BatchMemory | None, device: torch.device) -> None:
    """Refuse, in one line, a batch that cannot fit (InputError): how much it needs and is free, and the largest
    --batch_size that would fit, or what else to do when not even one image does."""
    if need is None:
        return
    free, where = free_memory(device)
    if need.total <= free:
        return
    fit = (free - need.fixed) // need.per_image if need.per_image else 0
    fit = min(fit, need.batch - 1)
    fix = ("lower --batch_size to 1" if fit == 1 else f"lower --batch_size to {fit} or less" if fit > 1
           else f"even one image needs {gib(need.fixed + need.per_image)}: {need.other_fix}")
    raise InputError(f"{need.flags} does not fit in memory: {need.what} needs at least {gib(need.total)} for {need.batch} "
                     f"images and {where} has {gib(free)} free; {fix}")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or any(m in str(error) for m in OUT_OF_MEMORY_MARKERS)


@contextlib.contextmanager
def explain_out_of_memory(flags: str, fix: str) -> Iterator[None]:
    """An allocation that fails inside the block (the estimate is a lower bound) becomes one line naming `flags` and
    `fix` (InputError, exit 2) instead of a traceback; any other error passes through."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        detail = " ".join(str(e).split())
        detail = detail[detail.find("DefaultCPUAllocator"):] if "DefaultCPUAllocator" in detail else detail
        raise InputError(f"out of memory at {flags} ({type(e).__name__}: {detail[:160]}): {fix}") from None
