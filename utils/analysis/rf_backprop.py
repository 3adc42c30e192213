"""The receptive field by backpropagation: a twin model whose input gradient is positive exactly on the theoretical
field, an output unit's input gradient, its support box, and the analytic box to compare it with."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from utils.analysis.rf_fields import AxisField

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                nn.ELU, nn.Mish, nn.PReLU)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.Dropout)


def theoretical_model(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A copy whose input gradient is positive exactly on the theoretical receptive field.

    Convolutions and Linear layers get constant positive weights (1/fan-in, bias 0), activations, batch norm
    and dropout become identities and max pools become average pools with the same window, so no path is
    switched off and no two paths cancel. float64 keeps the tiny contributions of the field's corners.
    """
    twin = copy.deepcopy(model).to(dtype).eval()

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, _ACTIVATIONS + _NORMS):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d) and child.dilation in (1, (1, 1)):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
            else:
                swap(child)

    swap(twin)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.fill_(1.0 / fan_in)
                if m.bias is not None:
                    m.bias.zero_()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def input_gradient(model: nn.Module, image: torch.Tensor, pixel: tuple[int, int] | None = None,
                   channel: int | None = None, weights: torch.Tensor | None = None) -> np.ndarray:
    """Gradient of output unit(s) w.r.t. a (1, C, H, W) image, as a (C, H, W) float64 array.

    pixel=(y, x) with channel=None backpropagates the sum over channels of that output position, with a
    channel its score only; `weights` (h, w) backpropagates the weighted sum of the channel's whole map.
    """
    p = next(iter(model.parameters()))
    x = image.detach().to(device=p.device, dtype=p.dtype).clone().requires_grad_(True)
    out = model(x)
    if out.dim() == 2:
        out = out[:, :, None, None]
    maps = out[0] if channel is None else out[0, channel:channel + 1]
    if weights is not None:
        target = (maps * weights.to(maps)).sum()
    else:
        y, xx = pixel if pixel is not None else (out.shape[-2] // 2, out.shape[-1] // 2)
        target = maps[:, y, xx].sum()
    (grad,) = torch.autograd.grad(target, x)
    return grad[0].detach().double().cpu().numpy()


def support_box(grad: np.ndarray, threshold: float = 0.0) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right), inclusive, of pixels whose |gradient| (summed over channels), normalised
    to a maximum of 1, exceeds `threshold` (0 = any non-zero gradient). None when nothing does."""
    mag = np.abs(grad).sum(axis=0) if grad.ndim == 3 else np.abs(grad)
    peak = mag.max()
    if peak <= 0:
        return None
    ys, xs = np.nonzero(mag / peak > threshold)
    if ys.size == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def analytic_box(local: tuple[AxisField, AxisField], pixel: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the analytic field of unit `pixel`, clipped to the image."""
    (y0, y1), (x0, x1) = local[0].span(pixel[0]), local[1].span(pixel[1])
    h, w = image_hw
    return max(y0, 0), max(x0, 0), min(y1, h - 1), min(x1, w - 1)


def is_interior(local: tuple[AxisField, AxisField], pixel: tuple[int, int], image_hw: tuple[int, int]) -> tuple[bool, bool]:
    """Whether the field of `pixel` lies inside the image along (y, x)."""
    out = []
    for ax, i, n in zip(local, pixel, image_hw):
        lo, hi = ax.span(i)
        out.append(lo >= 0 and hi <= n - 1)
    return out[0], out[1]
