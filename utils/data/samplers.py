"""Samplers: evaluation shards for torchrun (each image once), and the class-balanced training sampler with the
matching loss weights for imbalanced folders."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler, WeightedRandomSampler

SAMPLERS = ("random", "balanced")
CLASS_WEIGHTS = ("none", "balanced")


class ShardSampler(Sampler[int]):
    """Unlike DistributedSampler, never pads, so metrics summed over processes cover each image once."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def targets_of(dataset) -> torch.Tensor:
    """The class index of every sample, as int64 (image folders' `targets` list, torchvision's tensors alike)."""
    return torch.as_tensor(dataset.targets, dtype=torch.int64)


def class_counts(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(targets, minlength=num_classes)


def balanced_class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency loss weights, scikit-learn's "balanced": n_samples / (n_classes * count_c), float32.
    A class with no sample gets weight 0 (it never appears in the loss anyway)."""
    counts = class_counts(targets, num_classes).double()
    weights = torch.where(counts > 0, len(targets) / (num_classes * counts.clamp(min=1)), 0.0)
    return weights.float()


class BalancedSampler(WeightedRandomSampler):
    """WeightedRandomSampler with weight 1/count(class) per sample, so every class is drawn equally often (with
    replacement). Under torchrun each process draws its own `num_samples` (the epoch length divided by the processes)
    from a stream seeded by (seed, rank, epoch): set_epoch makes each epoch's draw depend only on those."""

    def __init__(self, targets: torch.Tensor, num_classes: int, *, seed: int, rank: int = 0, world_size: int = 1):
        counts = class_counts(targets, num_classes).double()
        super().__init__(1.0 / counts[targets], num_samples=math.ceil(len(targets) / world_size), replacement=True,
                         generator=torch.Generator())
        self.seed, self.rank = seed, rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + 1_000_003 * self.rank + epoch)
