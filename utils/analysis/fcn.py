"""Using the fully convolutional ResNet18 (models/fcn.py): load it, prepare a full-resolution image, rank classes
over the score map, place the map on the image and find the region a class occupies. Shared by fcn_resnet18.py
and receptive_field_backprop.py."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from models import pretrained_state_dict
from models.fcn import FCNResNet18, fcn_from_resnet
from utils.analysis.rf_trace import receptive_fields
from utils.checkpoint import build_from_checkpoint, load_checkpoint
from utils.data.preprocess import Preprocess, normalize, to_model_mode
from utils.errors import InputError
from utils.model_info import ModelInfo
from utils.regions import largest_component


def load_fcn(weights: str | None = None, device: torch.device | str = "cpu") -> tuple[FCNResNet18, nn.Module, ModelInfo]:
    """(fcn, standard resnet18, info) with ImageNet weights (weights=None) or a project resnet18 checkpoint.

    The two networks share their layers. ImageNet weights come through models.pretrained_state_dict: offline
    without the cached file this raises the one-line InputError saying where to put it.
    """
    if weights is None:
        resnet = torchvision.models.resnet18()
        resnet.load_state_dict(pretrained_state_dict("resnet18"))
        info = ModelInfo("resnet18", list(torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]), Preprocess.for_size(224),
                         source="torchvision ImageNet weights (ResNet18_Weights.DEFAULT)")
    else:
        ckpt = load_checkpoint(weights)
        if ckpt["model_name"] != "resnet18":
            raise InputError(f"{weights} holds a {ckpt['model_name']!r} model: the FCN conversion needs a resnet18 checkpoint "
                             "(train one with: python train.py --model resnet18)")
        resnet, info = build_from_checkpoint(ckpt, source=f"checkpoint {weights}")
    resnet = resnet.to(device).eval()
    fcn = fcn_from_resnet(resnet, info.preprocess.img_size).to(device).eval()
    return fcn, resnet, info


def fcn_image_tensor(img: Image.Image, pre: Preprocess, max_side: int = 0) -> tuple[torch.Tensor, Image.Image]:
    """(normalised (1, C, H, W) tensor, the PIL image it was made from) at full resolution, or shrunk so the
    longer side is <= max_side (0 = never shrink)."""
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
    values = np.asarray(values, dtype=np.float64)
    h_img, w_img = image_hw
    ys, xs = np.arange(h_img), np.arange(w_img)
    rows = np.stack([np.interp(xs, centers_x, row) for row in values])         # (h, W)
    return np.stack([np.interp(ys, centers_y, rows[:, j]) for j in range(w_img)], axis=1)  # (H, W)


def largest_region_box(score, threshold: float, centers_y, centers_x, stride: int,
                       image_hw: tuple[int, int]) -> tuple[tuple[int, int, int, int] | None, str]:
    """Image box (top, left, bottom, right) of the largest 4-connected region of the min-max normalised map
    at or above `threshold`; (None, reason) when the map is flat (a single unit or constant)."""
    score = np.asarray(score, dtype=np.float64)
    lo, hi = float(score.min()), float(score.max())
    if score.size == 1 or hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return None, "the score map is flat (one unit or constant values): no region to localise"
    mask = (score - lo) / (hi - lo) >= threshold
    ys, xs = largest_component(mask)
    h_img, w_img = image_hw
    half = stride / 2
    top = int(max(0, np.floor(centers_y[min(ys)] - half)))
    left = int(max(0, np.floor(centers_x[min(xs)] - half)))
    bottom = int(min(h_img - 1, np.ceil(centers_y[max(ys)] + half)))
    right = int(min(w_img - 1, np.ceil(centers_x[max(xs)] + half)))
    return (top, left, bottom, right), f"largest region: {len(ys)} of {score.size} map units >= {threshold:g} (normalised)"


def score_geometry(fcn: nn.Module, input_size: tuple[int, int, int]):
    """Per-axis field of the score map for a (C, H, W) input (utils.analysis.rf_fields.AxisField pair):
    unit i sees input pixels [start + i*stride, start + i*stride + size - 1]. Traced on a meta-device copy."""
    shadow = copy.deepcopy(fcn).to("meta")
    report = receptive_fields(shadow, input_size, device="meta")
    return report.output.local
