"""Random state: train.py seeds every epoch from (seed, epoch, rank) before anything draws from it, so a resumed run
repeats exactly without an RNG snapshot in the checkpoint (older checkpoints carry one under "rng"; it is ignored)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

