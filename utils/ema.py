"""Exponential moving average of model weights, with a warm-up of the decay (as Ultralytics / timm)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def ema_decay(updates: int, decay: float = 0.9999, tau: float = 2000.0) -> float:
    """Effective decay after `updates` optimizer steps: decay * (1 - exp(-updates / tau)).

    Starts near 0 (the EMA follows the model closely) and rises towards `decay`, so a short run
    still gets a useful average instead of one dominated by the random initialisation.
    """
    return decay * (1.0 - math.exp(-updates / tau))


class ModelEMA:
    """ema = d * ema + (1 - d) * model, for every parameter and floating-point buffer; integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = ema_decay(self.updates, self.decay, self.tau)
        source = unwrap(model).state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = source[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(d).add_(value.to(ema_value.dtype), alpha=1.0 - d)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates, self.decay, self.tau = state["updates"], state["decay"], state["tau"]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
