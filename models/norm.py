"""Normalisation layer factory: BN, GN or none, so `--norm_type` really swaps the layer."""

from __future__ import annotations

import math

from torch import nn

NORM_TYPES = ("BN", "GN", "none")


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of `channels` not above `max_groups` (GroupNorm needs an exact split)."""
    return math.gcd(channels, max_groups)


class GroupNorm2d(nn.GroupNorm):
    """GroupNorm taking BatchNorm2d's signature, so it can be passed as `norm_layer`."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = None, **_):
        super().__init__(group_count(num_features), num_features, eps=eps)


class NoNorm(nn.Identity):
    """Identity taking BatchNorm2d's signature."""

    def __init__(self, num_features: int = 0, *args, **kwargs):
        super().__init__()


def norm_layer_class(norm_type: str):
    if norm_type == "BN":
        return nn.BatchNorm2d
    if norm_type == "GN":
        return GroupNorm2d
    if norm_type == "none":
        return NoNorm
    raise ValueError(f"unknown --norm_type {norm_type!r}: choose from {', '.join(NORM_TYPES)}")


def make_norm2d(norm_type: str, channels: int) -> nn.Module:
    return norm_layer_class(norm_type)(channels)
