"""SpeedNet: a network sized for 28-32 px images and a few CPU cores, after the CIFAR-10 speed runs (airbench,
Jordan 2024; the DAWNBench ResNet-9 before it): what pays there is a plain conv-BN-GELU stack that pools early,
wide late stages instead of deep ones, and an init that lets a short run start learning at once.

Layout at 28 px (1.15 M parameters, 43 M MACs per image): a 2x2 stem conv without padding (27 px; 8 filters per input
channel, sized so `whiten_stem` can make it a whitening filter bank), then three stages of [conv3x3 -> maxpool2 ->
BN -> GELU -> conv3x3 -> BN -> GELU] at 64/128/256 channels (13, 6, 3 px), a global max-pool and a bias-free linear
head whose logits are scaled by 1/9. Pooling right after each stage's first conv runs the second conv at a quarter of the pixels:
most of the compute sits at 13 px and below, which suits a CPU. Larger images work (any size >= 9 px) but the network
was sized for small ones.

Widths: airbench's 64/256/256 (1.96 M parameters) costs 82 M MACs per 28 px image, which on 2 CPU cores buys only two
or three Fashion-MNIST epochs in 10 minutes; 64/128/256 costs half the MACs and ran 2.9x faster per training step
(bf16 channels_last, batch 256, 1 thread; 366 against 125 img/s, indicative: measured on a shared 2-core Xeon with
AMX). `SpeedNet(widths=...)` builds other sizes.

Init: every 3x3 conv starts as a partial identity (Dirac on its first min(in, out) filters, the rest random), so at
step 0 the stack passes its input through and a short run does not spend epochs finding a signal path (airbench's
"identity init").
"""

from __future__ import annotations

import torch
from torch import nn

from models.norm import make_norm2d

WIDTHS = (64, 128, 256)
STEM_KERNEL = 2
LOGIT_SCALE = 1 / 9
MIN_IMG_SIZE = 9  # 2x2 stem without padding (-1 px), then three 2x2 max-pools need >= 8 px


def stem_width(in_channels: int) -> int:
    """Two filters (+ and -) per dimension of a 2x2 patch: 24 for RGB, 8 for grey."""
    return 2 * in_channels * STEM_KERNEL * STEM_KERNEL


class ConvGroup(nn.Sequential):
    """conv3x3 -> maxpool2 -> norm -> GELU -> conv3x3 -> norm -> GELU."""

    def __init__(self, c_in: int, c_out: int, norm_type: str):
        bias = norm_type == "none"
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), nn.MaxPool2d(2), make_norm2d(norm_type, c_out),
                         nn.GELU(), nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias), make_norm2d(norm_type, c_out),
                         nn.GELU())


class SpeedNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm_type: str = "BN", widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        stem = stem_width(in_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, STEM_KERNEL, padding=0, bias=True), nn.GELU())
        self.layers = nn.Sequential(*(ConvGroup(c_in, c_out, norm_type)
                                      for c_in, c_out in zip((stem, *widths[:-1]), widths)))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = LOGIT_SCALE  # tempers the logits' early growth (as ResNet-9's 1/8)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.layers.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                n = min(m.in_channels, m.out_channels)
                nn.init.dirac_(m.weight[:n])  # partial identity; the other filters keep PyTorch's default init

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x))))) * self.logit_scale


@torch.no_grad()
def whiten_stem(model: SpeedNet, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Make the 2x2 stem a whitening filter bank of the training images (airbench's init; optional): its filters are
    the eigenvectors of the 2x2-patch covariance, scaled by 1/sqrt(eigenvalue + eps), each with its
    negative (so GELU keeps both signs). Why: the first layer then hands decorrelated, unit-variance
    features to the rest from step 0, instead of spending the first epoch learning what the pixel statistics are.
    `images`: a normalised (N, C, H, W) float batch of training images (a few thousand patches suffice)."""
    conv = model.stem[0]
    k, c = STEM_KERNEL, conv.in_channels
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).float().reshape(-1, c, k, k)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))
    conv.bias.zero_()
