"""Exponential moving average of the weights, updated as in timm's ModelEmaV3, with the decay warm-up of
Ultralytics/timm.

ema = d * ema + (1 - d) * model, i.e. lerp(ema, model, 1 - d), for every parameter and floating-point buffer (integer
buffers such as BatchNorm's num_batches_tracked are copied), with d = decay * (1 - exp(-updates / tau)): near 0 at
first, so a short run's average is not dominated by the random initialisation, rising towards `decay`. One
`torch._foreach_lerp_` over all floating-point tensors does the update (one kernel launch per device and dtype).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn

from utils.distributed import is_distributed


def ema_decay(updates: int, decay: float = 0.9999, tau: float = 2000.0) -> float:
    """Effective decay after `updates` optimizer steps: decay * (1 - exp(-updates / tau))."""
    return decay * (1.0 - math.exp(-updates / tau))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class ModelEMA:
    """The EMA of a model's weights; `module` is the averaged network (eval mode, no gradients).

    The checkpoint entry (`state_dict`) is {"module", "updates", "decay", "tau"}, as in every checkpoint so far.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.decay, self.tau, self.updates = decay, tau, updates
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [*model.parameters(), *model.buffers()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        ema_float, model_float = [], []
        for ema_t, model_t in zip(self._tensors(self.module), self._tensors(unwrap(model)), strict=True):
            if ema_t.is_floating_point():
                ema_float.append(ema_t)
                model_float.append(model_t.detach())
            else:  # integer buffers are counters, copied
                ema_t.copy_(model_t)
        torch._foreach_lerp_(ema_float, model_float, 1.0 - ema_decay(self.updates, self.decay, self.tau))

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Under torchrun: give every process rank 0's EMA buffers (BatchNorm statistics). The parameters agree on
        every rank (same all-reduced gradients), but each process's BatchNorm statistics follow its own batches, so
        without this each process would validate a slightly different network than the one rank 0 saves."""
        if is_distributed():
            for buffer in self.module.buffers():
                dist.broadcast(buffer, src=0)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates, self.decay, self.tau = state["updates"], state["decay"], state["tau"]
