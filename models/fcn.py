"""Fully convolutional ResNet18: a class score map instead of one vector of logits.

The global average pool becomes a fixed average pool (7x7 at 224 px) with stride 1, and the final
Linear becomes a 1x1 convolution holding the same weights and bias. At the training size the network
computes exactly what ResNet18 computes; on a larger image it slides that classifier over every
7x7 window of the last feature map, giving one score vector per window (a score map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def resnet_feature_size(model: ResNet, img_size: int) -> int:
    """Side of ResNet's last feature map for a square `img_size` input (7 at 224 with the standard stem)."""
    size = img_size
    stem = [model.conv1] + ([model.maxpool] if isinstance(model.maxpool, nn.MaxPool2d) else [])
    for layer in stem:
        k, s, p = (layer.kernel_size, layer.stride, layer.padding)
        k, s, p = (v[0] if isinstance(v, tuple) else v for v in (k, s, p))
        size = _conv_out(size, k, s, p)
    for layer in (model.layer2, model.layer3, model.layer4):
        stride = layer[0].conv1.stride[0] if layer[0].conv1.stride[0] > 1 else layer[0].conv2.stride[0]
        size = _conv_out(size, 3, stride, 1)
    return max(size, 1)


class ScorePool(nn.Module):
    """Average pool with a fixed window and stride 1; on a map smaller than the window it averages what exists.

    The window is clipped per axis to the map (a 4x4 map with a 7x7 window gives the 4x4 mean), so small
    inputs never crash. Inputs whose map is at least `window` wide use the fixed window only, which is what
    a dynamic-shape ONNX export records when traced at or above the training size.
    """

    def __init__(self, window: int = 7):
        super().__init__()
        self.window = int(window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        if h >= self.window and w >= self.window:
            return F.avg_pool2d(x, self.window, stride=1)
        return F.avg_pool2d(x, (min(self.window, h), min(self.window, w)), stride=1)

    def extra_repr(self) -> str:
        return f"window={self.window}, stride=1"


class FCNResNet18(nn.Module):
    """ResNet18 with its head made convolutional; same parameter names as torchvision's ResNet.

    A project resnet18 checkpoint (or torchvision's ImageNet state dict) loads directly: `fc.weight`
    of shape (K, 512) is reshaped to (K, 512, 1, 1) on load.
    """

    def __init__(self, resnet: ResNet, pool_window: int = 7):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.avgpool = ScorePool(pool_window)
        linear: nn.Linear = resnet.fc
        self.fc = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=True)
        with torch.no_grad():
            self.fc.weight.copy_(linear.weight[:, :, None, None])
            self.fc.bias.copy_(linear.bias)
        self._register_load_state_dict_pre_hook(self._linear_to_conv_weight)

    @staticmethod
    def _linear_to_conv_weight(state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "fc.weight"
        if key in state_dict and state_dict[key].dim() == 2:
            state_dict[key] = state_dict[key][:, :, None, None]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (layer4's output), before the score pool."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, num_classes, h, w) class scores (logits), h = w = 1 at the training size."""
        return self.fc(self.avgpool(self.features(x)))


def fcn_from_resnet(resnet: ResNet, img_size: int = 224) -> FCNResNet18:
    """Make `resnet` fully convolutional; the pool window is its last feature map's side at `img_size`."""
    return FCNResNet18(resnet, pool_window=resnet_feature_size(resnet, img_size))
