"""Exponential moving average of the weights through torch's AveragedModel, with the decay warm-up of Ultralytics/timm.

ema = d * ema + (1 - d) * model for every parameter and floating-point buffer (integer buffers such as BatchNorm's
num_batches_tracked are copied), with d = decay * (1 - exp(-updates / tau)): near 0 at first, so a short run's
average is not dominated by the random initialisation, rising towards `decay`. AveragedModel's own EMA helper has
no warm-up, so the update is a custom `multi_avg_fn`: two foreach kernels over all tensors of one dtype.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

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
        self.averaged = AveragedModel(unwrap(model), multi_avg_fn=self._average, use_buffers=True)
        # AveragedModel copies the weights on its first update; here the copy made at construction is the start,
        # so every update (the first included) is a decayed average
        self.averaged.n_averaged.fill_(1)
        self.module.eval().requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def _average(self, ema: list[torch.Tensor], current: list[torch.Tensor], _n_averaged) -> None:
        if not ema[0].is_floating_point():  # one group per dtype: integer buffers are counters, copied
            torch._foreach_copy_(ema, current)
            return
        d = ema_decay(self.updates, self.decay, self.tau)
        torch._foreach_mul_(ema, d)
        torch._foreach_add_(ema, current, alpha=1.0 - d)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        self.averaged.update_parameters(unwrap(model))

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
