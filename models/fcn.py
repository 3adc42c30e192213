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


def fcn_resnet18(num_classes: int = 1000, img_size: int = 224, **resnet_kwargs) -> FCNResNet18:
    """Build the registry's resnet18 (same kwargs as build_model) and convert it."""
    from models import build_model

    resnet = build_model("resnet18", num_classes, img_size=img_size, **resnet_kwargs)
    return fcn_from_resnet(resnet, img_size)


# ---------------------------------------------------------------------------------------------------------------
# Inference helpers shared by fcn_resnet18.py and receptive_field_backprop.py


def load_fcn(weights: str | None = None, device: torch.device | str = "cpu"):
    """(fcn, standard resnet18, info) with ImageNet weights (weights=None) or a project resnet18 checkpoint.

    info: classes, preprocess (utils.preprocess.Preprocess), source. The two networks share their layers.
    ImageNet weights come through models.pretrained_state_dict: offline without the cached file this raises
    the one-line InputError saying where to put it.
    """
    import torchvision

    from models import pretrained_state_dict
    from utils.checkpoint import build_from_checkpoint, load_checkpoint
    from utils.data.preprocess import Preprocess
    from utils.errors import InputError

    if weights is None:
        state = pretrained_state_dict("resnet18")
        resnet = torchvision.models.resnet18()
        resnet.load_state_dict(state)
        info = {"classes": list(torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]),
                "preprocess": Preprocess.for_size(224), "source": "torchvision ImageNet weights (ResNet18_Weights.DEFAULT)"}
    else:
        ckpt = load_checkpoint(weights)
        if ckpt["model_name"] != "resnet18":
            raise InputError(f"{weights} holds a {ckpt['model_name']!r} model: the FCN conversion needs a resnet18 checkpoint "
                             "(train one with: python train.py --model resnet18)")
        resnet, meta = build_from_checkpoint(ckpt)
        info = {"classes": meta["classes"], "preprocess": meta["preprocess"], "source": f"checkpoint {weights}"}
    resnet = resnet.to(device).eval()
    fcn = fcn_from_resnet(resnet, info["preprocess"].img_size).to(device).eval()
    return fcn, resnet, info


def fcn_image_tensor(img, pre, max_side: int = 0):
    """(normalised (1, C, H, W) tensor, the PIL image it was made from) at full resolution, or shrunk so the
    longer side is <= max_side (0 = never shrink)."""
    from PIL import Image

    from utils.data.preprocess import normalize, to_model_mode

    img = to_model_mode(img, pre.channels)
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BILINEAR)
    return torch.from_numpy(normalize(img, pre))[None], img


def rank_classes(score_map: torch.Tensor, k: int = 5) -> list[dict]:
    """Top-k classes of a (K, h, w) logit map: per-location softmax, each class scored by its best location."""
    prob = score_map.float().softmax(0)
    k = min(k, prob.shape[0])
    best, where = prob.flatten(1).max(1)
    top = best.topk(k)
    w = prob.shape[2]
    return [{"index": int(i), "prob": float(p), "location": (int(where[i]) // w, int(where[i]) % w)}
            for p, i in zip(top.values, top.indices)]


def map_to_image(values, centers_y, centers_x, image_hw: tuple[int, int]):
    """Resample a (h, w) score map onto the image grid, each unit placed at its receptive-field centre."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    h_img, w_img = image_hw
    ys, xs = np.arange(h_img), np.arange(w_img)
    rows = np.stack([np.interp(xs, centers_x, row) for row in values])         # (h, W)
    return np.stack([np.interp(ys, centers_y, rows[:, j]) for j in range(w_img)], axis=1)  # (H, W)


def largest_region_box(score, threshold: float, centers_y, centers_x, stride: int,
                       image_hw: tuple[int, int]) -> tuple[tuple[int, int, int, int] | None, str]:
    """Image box (top, left, bottom, right) of the largest 4-connected region of the min-max normalised map
    at or above `threshold`; (None, reason) when the map is flat (a single unit or constant)."""
    import numpy as np

    score = np.asarray(score, dtype=np.float64)
    lo, hi = float(score.min()), float(score.max())
    if score.size == 1 or hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return None, "the score map is flat (one unit or constant values): no region to localise"
    mask = (score - lo) / (hi - lo) >= threshold
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    ys, xs = [p[0] for p in best], [p[1] for p in best]
    h_img, w_img = image_hw
    half = stride / 2
    top = int(max(0, np.floor(centers_y[min(ys)] - half)))
    left = int(max(0, np.floor(centers_x[min(xs)] - half)))
    bottom = int(min(h_img - 1, np.ceil(centers_y[max(ys)] + half)))
    right = int(min(w_img - 1, np.ceil(centers_x[max(xs)] + half)))
    return (top, left, bottom, right), f"largest region: {len(best)} of {score.size} map units >= {threshold:g} (normalised)"


def score_geometry(fcn: nn.Module, input_size: tuple[int, int, int]):
    """Per-axis field of the score map for a (C, H, W) input (utils.receptive_field.AxisField pair):
    unit i sees input pixels [start + i*stride, start + i*stride + size - 1]. Traced on a meta-device copy."""
    import copy

    from utils.receptive_field import receptive_fields

    shadow = copy.deepcopy(fcn).to("meta")
    report = receptive_fields(shadow, input_size, device="meta")
    return report.output.local
