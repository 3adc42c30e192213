"""--whiten_stem: SpeedNet's first layer initialised as a whitening filter bank of the training images
(models.speednet.whiten_stem says why), for new runs only (--resume and --init_from bring trained weights)."""

from __future__ import annotations

import torch
from torch import nn

from models.speednet import SpeedNet, whiten_stem

WHITEN_IMAGES = 512  # 512 images of 28 px give 365,000 2x2 patches: the covariance of 4-12 numbers is settled


def whiten_from_dataset(model: nn.Module, dataset, device: torch.device, count: int = WHITEN_IMAGES) -> int:
    """Whiten `model`'s stem from `count` training images spread evenly over `dataset` (as the training transform gives
    them: a flip does not change patch statistics). Returns the number of images used. Under torchrun, DDP's start
    copies rank 0's weights to every process."""
    if not isinstance(model, SpeedNet):
        raise TypeError(f"--whiten_stem needs speednet, got {type(model).__name__}")
    n = min(count, len(dataset))
    index = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()
    images = torch.stack([dataset[i][0] for i in index]).to(device)
    whiten_stem(model, images)
    return n
