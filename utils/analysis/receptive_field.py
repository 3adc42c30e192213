"""The seed's receptive-field formulas for one chain of layers: `calculate_RF` (kernel, stride) and
`get_receptive_field` (with dilation).

For any network graph (residual additions, concatenations, squeeze-excitation, views) use
`utils.analysis.rf_trace.receptive_fields`; the field's notation and the report are in `rf_fields`, the
backpropagation check in `rf_backprop`.
"""

from __future__ import annotations

from collections.abc import Sequence


def calculate_RF(layers: Sequence[tuple[int, int]]) -> int:  # noqa: N802 (the seed's name)
    """Receptive field of the last layer of a chain of (kernel, stride) layers, top-down: r = (r - 1) * s + k.

    >>> calculate_RF([(3, 1), (3, 1), (2, 2)])  # two 3x3 convs and a 2x2 pool
    6
    """
    rf = 1
    for kernel, stride in reversed(list(layers)):
        rf = (rf - 1) * stride + kernel
    return rf


def get_receptive_field(kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
                        dilation: int | Sequence[int] = 1) -> int:
    """Receptive field of a chain given per-layer kernels, strides and dilations (scalars = one layer).

    Bottom-up form of `calculate_RF` with dilation: r += d*(k-1) * j, then j *= s.

    >>> get_receptive_field([3, 3], [1, 1], [1, 2])  # a 3x3 conv, then a 3x3 conv with dilation 2
    7
    """
    kernels = [kernel] if isinstance(kernel, int) else list(kernel)
    n = len(kernels)
    strides = [stride] * n if isinstance(stride, int) else list(stride)
    dilations = [dilation] * n if isinstance(dilation, int) else list(dilation)
    if not (len(strides) == len(dilations) == n):
        raise ValueError(f"kernel, stride and dilation need one value per layer, got {n}, {len(strides)}, {len(dilations)}")
    rf, jump = 1, 1
    for k, s, d in zip(kernels, strides, dilations):
        rf += d * (k - 1) * jump
        jump *= s
    return rf
