"""Model registry: one entry point, `build_model(name, num_classes, ...)`.

Training models: the ResNet, MobileNet and EfficientNet-B0 builders of torchvision, the DAWNBench-style
ResNet-9 (`resnet9`, models/resnet9.py), the airbench-style SpeedNet for small images on CPUs (`speednet`,
models/speednet.py) and the project's FashionCNN (`custom`). Analysis scripts may also name any other torchvision
classification model (vgg16, alexnet, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from models.fashion_cnn import FashionCNN
from models.fcn import fcn_from_resnet
from models.norm import NORM_TYPES, norm_layer_class
from models.resnet9 import ResNet9
from models.speednet import MIN_IMG_SIZE as SPEEDNET_MIN_IMG_SIZE
from models.speednet import SpeedNet
from utils.errors import InputError

TORCHVISION_NAMES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
)
MODEL_NAMES = ("custom", "resnet9", "speednet") + TORCHVISION_NAMES
ANALYSIS_NAMES = ("fcn_resnet18",)  # analysis-only: ResNet18 made fully convolutional (models/fcn.py)
SMALL_INPUT_MAX = 64  # at or below this --img_size, "auto" uses the stride-1 stem


def torchvision_classifiers() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def resolve_small_input(small_input: str | bool, img_size: int) -> bool:
    if isinstance(small_input, bool):
        return small_input
    return {"auto": img_size <= SMALL_INPUT_MAX, "on": True, "off": False}[small_input]


def min_img_size(name: str, small_input: bool) -> int:
    """The smallest --img_size the network runs at. FashionCNN's three 2x2 poolings need 8 px; ResNet9's three
    unpadded 2x2 poolings need 8 px after its stem, so 8 with the stride-1 stem and 31 with the large-input one
    (stride-2 padded conv, then a 2x2 pool); torchvision's networks pad every stage and pool adaptively, so any
    size runs; SpeedNet's unpadded 2x2 stem and three 2x2 poolings need 9 px. tests/test_bad_flags.py proves each
    bound by forward passes at the bound and one pixel below."""
    if name == "custom":
        return 8
    if name == "resnet9":
        return 8 if small_input else 31
    if name == "speednet":
        return SPEEDNET_MIN_IMG_SIZE
    return 1


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer for a fresh one with `num_classes` outputs."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    if last.out_features != num_classes:
        _replace_module(model, name, nn.Linear(last.in_features, num_classes))


def _adapt_first_conv(model: nn.Module, in_channels: int, small_input: bool, family: str) -> None:
    """The stem for small images and/or another channel count. A grayscale stem is made from the RGB one: pretrained
    ("pretrained"), the sum of its three input filters (timm's choice: grey x summed filter = the RGB response to a
    grey image); randomly initialised, that sum / sqrt(3), which keeps the network's own init distribution."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if small_input and family == "resnet":
        # CIFAR-style stem: 3x3 stride-1 conv and no max-pool keep 28-32 px inputs from collapsing.
        conv = nn.Conv2d(in_channels, conv.out_channels, 3, 1, 1, bias=False)
        _replace_module(model, name, conv)
        model.maxpool = nn.Identity()
        return
    if small_input:
        conv.stride = (1, 1)
    if in_channels != conv.in_channels:
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                        conv.groups, conv.bias is not None)
        if in_channels == 1 and not conv.weight.is_meta:
            with torch.no_grad():
                new.weight.copy_(conv.weight.sum(1, keepdim=True) / (1.0 if family == "pretrained" else 3 ** 0.5))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
        _replace_module(model, name, new)


def pretrained_state_dict(name: str) -> dict:
    """ImageNet weights through torchvision's weights enum and TORCH_HOME cache; one clear error offline."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cache_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # URLError, HTTPError, socket errors: all mean the file is not there
        raise InputError(f"cannot load ImageNet weights for {name} ({type(e).__name__}: {e}): download "
                         f"{weights.url} and put it at {cache_file}") from None


def build_model(name: str, num_classes: int, pretrained: bool = False, norm_type: str = "BN",
                img_size: int = 224, in_channels: int = 3, small_input: str | bool = False,
                freeze_backbone: bool = False) -> nn.Module:
    """Build a registry model (or any torchvision classifier) for `num_classes` outputs."""
    if norm_type not in NORM_TYPES:
        raise InputError(f"unknown --norm_type {norm_type!r}: choose from {', '.join(NORM_TYPES)}")
    small = resolve_small_input(small_input, img_size)
    if name == "custom":
        if pretrained:
            raise InputError("--pretrained: there are no ImageNet weights for the custom FashionCNN; drop the flag")
        return FashionCNN(num_classes, img_size, in_channels, norm_type)
    if name in ("resnet9", "speednet"):
        if pretrained:
            raise InputError(f"--pretrained: there are no ImageNet weights for {name}; drop the flag")
        model = (ResNet9(num_classes, in_channels, norm_type, small_input=small) if name == "resnet9"
                 else SpeedNet(num_classes, in_channels, norm_type))
        if freeze_backbone:
            for pname, p in model.named_parameters():
                p.requires_grad = pname.startswith("fc.")
        return model
    if name == "fcn_resnet18":  # the registry's resnet18, made fully convolutional
        resnet = build_model("resnet18", num_classes, pretrained=pretrained, norm_type=norm_type, img_size=img_size,
                             in_channels=in_channels, small_input=small, freeze_backbone=freeze_backbone)
        return fcn_from_resnet(resnet, img_size)
    if name not in torchvision_classifiers():
        raise InputError(f"unknown model {name!r}: choose from {', '.join(MODEL_NAMES + ANALYSIS_NAMES)} "
                         "(analysis scripts also take any torchvision classifier, e.g. vgg16)")
    if pretrained and norm_type != "BN":
        raise InputError("--pretrained weights were trained with BatchNorm: use --norm_type BN with --pretrained")
    kwargs = {} if norm_type == "BN" or name not in TORCHVISION_NAMES else {"norm_layer": norm_layer_class(norm_type)}
    model = torchvision.models.get_model(name, weights=None, num_classes=1000 if pretrained else num_classes, **kwargs)
    if pretrained:
        model.load_state_dict(pretrained_state_dict(name))
        replace_head(model, num_classes)
    if small and name.startswith("resnet"):
        _adapt_first_conv(model, in_channels, small, "resnet")
    elif small or in_channels != 3:
        _adapt_first_conv(model, in_channels, small, "pretrained" if pretrained else "other")
    if freeze_backbone:
        head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        for pname, p in model.named_parameters():
            p.requires_grad = pname.startswith(head + ".")
    return model


def model_kwargs(img_size: int, norm_type: str = "BN", in_channels: int = 3, small_input: str | bool = "auto") -> dict:
    """The keyword arguments saved in a checkpoint so `build_model` can rebuild the same network."""
    return {"img_size": img_size, "norm_type": norm_type, "in_channels": in_channels,
            "small_input": resolve_small_input(small_input, img_size)}


def count_parameters(model: nn.Module) -> int:
    """All parameters (trainable or frozen), as the params columns everywhere report them."""
    return sum(p.numel() for p in model.parameters())
