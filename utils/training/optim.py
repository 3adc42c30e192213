"""The optimizer, with weight decay on weights only (not on biases and normalisation parameters), as timm does."""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """SGD (Nesterov when momentum > 0), Adam or AdamW (momentum = beta1) over the trainable parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, betas=(momentum, 0.999))
