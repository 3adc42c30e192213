"""Heat maps of a prediction through Captum: Grad-CAM on a convolutional layer, occlusion, integrated gradients.

Why Captum (captum==0.9.0, pinned in requirements.txt) rather than our own hooks: its three methods are the reference
implementations that papers and other tools are compared against (gradient bookkeeping, occlusion windows and
baselines, the integral's quadrature and batching), maintained with PyTorch itself; what is ours is what Captum does
not know: which layer of any registry network to look at, the network's input geometry, and the original image.

Every heat map is returned at the network's input size (crop pixels, utils.explain.geometry maps it onto the
original image), non-negative, larger = more evidence for the target class:
  gradcam    ReLU(sum_k mean(d score / d A_k) * A_k) on the layer's map A, upsampled bilinearly (Selvaraju et al. 2017)
  occlusion  the drop of the target's score when a gray (zero after normalisation, i.e. the mean colour) square of a
             quarter of the input's side hides each place, stride half that; no gradients, any network
  integrated_gradients  |sum over channels| of the path integral of gradients from the mean-colour image
             (Sundararajan et al. 2017), pixel-level; smoothed by a small box filter for the peak and the box
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import InputError

METHODS = ("gradcam", "occlusion", "integrated_gradients")
MIN_CAM_SIDE = 7  # the automatic layer: the last stage whose map is at least this many units on its shorter side
IG_STEPS = 32


class Logits(nn.Module):
    """(N, classes) logits of any registry network: a fully convolutional one's score map (N, classes, h, w) is
    averaged over its positions (at the training size it is 1 x 1, so this is its exact logit vector)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.flatten(2).mean(2) if out.dim() == 4 else out


@dataclass(frozen=True)
class LayerChoice:
    name: str
    shape: tuple[int, int, int]  # (channels, h, w) of its output at the input size
    automatic: bool

    def describe(self, size: int) -> str:
        c, h, w = self.shape
        how = (f"chosen automatically: the last stage whose map is at least {MIN_CAM_SIDE} x {MIN_CAM_SIDE}; --layer "
               "NAME to choose another" if self.automatic else "--layer")
        return f"layer {self.name} ({c} x {h} x {w} at {size} px; {how})"


def candidate_layers(model: nn.Module, channels: int, size: int) -> list[tuple[str, tuple[int, int, int]]]:
    """The stages Grad-CAM can use, in execution order: the network's children and its top-level containers'
    children (features.3, layer4, ...) whose output is a (C, h, w) map, the network's own output excepted, with that
    map's shape at `size` px (one forward pass on the meta device: nothing is computed). A container whose output is
    its last child's (ResNet's layer4 = layer4.1) is listed under the container's name only."""
    named = dict(model.named_children())
    names = []
    for name, child in named.items():
        names.append(name)
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            names += [f"{name}.{sub}" for sub, _ in child.named_children()]
    shapes: dict[str, tuple[int, int, int]] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, _inputs, output):
            if torch.is_tensor(output) and output.dim() == 4 and name not in shapes:
                for same in [n for n, o in outputs.items() if o is output]:  # a container stands for its last child
                    del shapes[same], outputs[same]
                shapes[name] = tuple(output.shape[1:])
                outputs[name] = output
        return record

    shadow = copy.deepcopy(model).to("meta")
    handles = [shadow.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            out = shadow(torch.zeros(1, channels, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return [(n, shapes[n]) for n in shapes if outputs[n] is not out]  # dicts keep the execution order


def choose_layer(model: nn.Module, channels: int, size: int, name: str | None) -> LayerChoice:
    """--layer NAME (checked against candidate_layers, the error lists them), or the last stage whose map is at
    least MIN_CAM_SIDE on its shorter side (the last one of all when none is)."""
    layers = candidate_layers(model, channels, size)
    if not layers:
        raise InputError("this network has no convolutional layer with a spatial map: use --method occlusion or "
                         "integrated_gradients")
    if name is not None:
        found = dict(layers)
        if name not in found:
            listed = ", ".join(f"{n} ({s[1]}x{s[2]})" for n, s in layers)
            raise InputError(f"--layer {name}: no such layer with a spatial map; choose from: {listed}")
        return LayerChoice(name, found[name], automatic=False)
    big = [(n, s) for n, s in layers if min(s[1], s[2]) >= MIN_CAM_SIDE]
    n, s = big[-1] if big else max(layers, key=lambda ns: min(ns[1][1], ns[1][2]))
    return LayerChoice(n, s, automatic=True)


def _layer_module(model: Logits, name: str) -> nn.Module:
    return model.model.get_submodule(name)


def occlusion_window(size: int) -> tuple[int, int]:
    """(window side, stride) of the occlusion squares: a quarter of the input side, half of that apart (7 x 7 places)."""
    window = max(2, size // 4)
    return window, max(1, window // 2)


def _smooth(heat: torch.Tensor, size: int) -> torch.Tensor:
    k = max(1, size // 16) | 1  # odd
    return F.avg_pool2d(heat[:, None], k, stride=1, padding=k // 2, count_include_pad=False)[:, 0] if k > 1 else heat


def heat_maps(model: Logits, images: torch.Tensor, targets: torch.Tensor, method: str,
              layer: str | None = None, batch_size: int = 64) -> torch.Tensor:
    """(N, H, W) non-negative heat maps at the input size for `targets` (N,) class indices (see the module doc)."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion

    size = images.shape[-1]
    if method == "gradcam":
        cam = LayerGradCam(model, _layer_module(model, layer))
        with torch.enable_grad():
            maps = cam.attribute(images, target=targets, relu_attributions=True)
        heat = LayerAttribution.interpolate(maps.detach(), images.shape[-2:], interpolate_mode="bilinear")[:, 0]
    elif method == "occlusion":
        window, stride = occlusion_window(size)
        c = images.shape[1]
        with torch.no_grad():
            attr = Occlusion(model).attribute(images, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                                              baselines=0.0, target=targets, perturbations_per_eval=max(1, batch_size))
        heat = attr[:, 0]  # the same value on every channel of a pixel
    elif method == "integrated_gradients":
        with torch.enable_grad():
            attr = IntegratedGradients(model).attribute(images, baselines=torch.zeros_like(images), target=targets,
                                                        n_steps=IG_STEPS, internal_batch_size=max(1, batch_size))
        heat = _smooth(attr.detach().sum(1).abs(), size)
    else:
        raise InputError(f"unknown --method {method!r}: choose from {', '.join(METHODS)}")
    return heat.clamp(min=0).float()


def probabilities(model: Logits, images: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return (model(images).float() / temperature).softmax(1)


def class_index(classes: Sequence[str], name: str) -> int:
    if name in classes:
        return list(classes).index(name)
    shown = ", ".join(classes[:30]) + (f", ... ({len(classes)} classes)" if len(classes) > 30 else "")
    raise InputError(f"--target_class {name!r} is not a class of this model; choose from: {shown}")
