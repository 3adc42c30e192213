"""ResNet-9: the small residual network of the DAWNBench CIFAR-10 records (Page, "How to train your ResNet", 2018),
sized for small images: four conv-BN-ReLU stages with max-pooling and two residual blocks, global max-pool, and a
linear head scaled by 1/8. At 28-32 px it keeps full resolution in its first stage (the point of it: no early
downsampling for small inputs); for larger images (small_input off) a stride-2 stem and a max-pool come first.
"""

from __future__ import annotations

from torch import nn

from models.norm import make_norm2d


def conv_block(c_in: int, c_out: int, norm_type: str, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm_type == "none"), make_norm2d(norm_type, c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class Residual(nn.Module):
    """x + two conv blocks of x."""

    def __init__(self, channels: int, norm_type: str):
        super().__init__()
        self.body = nn.Sequential(conv_block(channels, channels, norm_type), conv_block(channels, channels, norm_type))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """prep 64 -> [128, pool, residual] -> [256, pool] -> [512, pool, residual] -> global max-pool -> linear x 1/8."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm_type: str = "BN", small_input: bool = True,
                 width: int = 64):
        super().__init__()
        w = width
        stem = [nn.Conv2d(in_channels, w, 3, stride=1 if small_input else 2, padding=1, bias=norm_type == "none"),
                make_norm2d(norm_type, w), nn.ReLU(inplace=True)]
        if not small_input:
            stem.append(nn.MaxPool2d(2))
        self.prep = nn.Sequential(*stem)
        self.layer1 = nn.Sequential(conv_block(w, 2 * w, norm_type, pool=True), Residual(2 * w, norm_type))
        self.layer2 = conv_block(2 * w, 4 * w, norm_type, pool=True)
        self.layer3 = nn.Sequential(conv_block(4 * w, 8 * w, norm_type, pool=True), Residual(8 * w, norm_type))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * w, num_classes, bias=False)
        self.logit_scale = 0.125  # DAWNBench's fixed factor on the logits: it tempers their early growth

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(self.flatten(self.pool(x))) * self.logit_scale
