"""FashionCNN: the seed's small network, built for any input size."""

from __future__ import annotations

from torch import nn

from models.norm import make_norm2d


class FashionCNN(nn.Module):
    """3 x [conv3x3 - norm - ReLU - maxpool2] (16/32/64 channels) -> Linear(64*s*s, 256) -> ReLU -> Dropout -> Linear.

    s = img_size // 8; at 224 this is the seed's 12.87 M-parameter model.
    """

    def __init__(self, num_classes: int = 10, img_size: int = 224, in_channels: int = 3,
                 norm_type: str = "BN", dropout: float = 0.5):
        super().__init__()
        if img_size < 8:
            raise ValueError(f"FashionCNN needs --img_size >= 8, got {img_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in (16, 32, 64):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=norm_type == "none"),
                       make_norm2d(norm_type, width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        s = img_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * s * s, 256), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
