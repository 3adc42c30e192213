"""The model an analysis script looks at: the shared flags (`add_model_args`), what they describe (`AnalysisSpec`),
the model built from a checkpoint or the registry (`load_analysis_model`), the one-forward check and the stem of
the result files. Used by complexity_*.py and receptive_field.py."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models import MODEL_NAMES, build_model
from utils import cli
from utils.checkpoint import build_from_checkpoint, load_checkpoint
from utils.errors import InputError


def add_model_args(p: argparse.ArgumentParser, default_model: str = "resnet18") -> None:
    """--model, --num_classes, --input_size, --weights, --device, --json."""
    p.add_argument("--model", default=None,
                   help=f"registry name (custom, resnet18..152, mobilenet_v2/v3, efficientnet_b0, fcn_resnet18) or any "
                        f"torchvision classifier (vgg16, alexnet, ...); default {default_model}, or the checkpoint's model")
    p.add_argument("--num_classes", type=cli.positive(), default=None,
                   help="output classes; default 10 for the registry's training models, 1000 for other "
                        "(ImageNet) architectures and fcn_resnet18")
    p.add_argument("--input_size", type=cli.positive(), nargs=3, default=None, metavar=("C", "H", "W"),
                   help="input tensor size without the batch dimension; default 3 224 224 (or the checkpoint's)")
    p.add_argument("--weights", default=None, metavar="CKPT",
                   help="project checkpoint (train.py): model, classes and input size come from it")
    cli.add_device_arg(p, default="cpu")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout instead of tables")
    p.set_defaults(default_model=default_model)


def default_num_classes(name: str) -> int:
    return 10 if name in MODEL_NAMES else 1000


@dataclass(frozen=True)
class AnalysisSpec:
    """The model the flags of `add_model_args` describe: registry name (None: the checkpoint's, or `default_model`),
    project checkpoint, output classes (None: `default_num_classes`) and (C, H, W) input (None: the checkpoint's or
    3 x 224 x 224)."""

    model: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    input_size: Sequence[int] | None = None
    default_model: str = "resnet18"


@dataclass
class AnalysisModel:
    model: nn.Module
    name: str
    num_classes: int
    input_size: tuple[int, int, int]
    source: str
    classes: list[str] | None = None


def build_analysis_network(name: str, num_classes: int, img_size: int, in_channels: int, fast_init: bool, meta: bool = False,
                           **model_kwargs) -> nn.Module:
    """A registry (or torchvision) network; fast_init=True skips weight initialisation (built on the meta device, then
    left there when `meta`, else given uninitialised CPU memory), falling back to a normal build."""
    with warnings.catch_warnings():
        # torchvision's own notices on building googlenet/inception (their init will change): not the user's to act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchvision\.models")
        if fast_init:
            try:
                with torch.device("meta"):
                    model = build_model(name, num_classes, img_size=img_size, in_channels=in_channels, **model_kwargs)
                return model if meta else model.to_empty(device="cpu")
            except (NotImplementedError, RuntimeError):
                pass  # builders that compute with tensors (regnet) cannot run on the meta device
        return build_model(name, num_classes, img_size=img_size, in_channels=in_channels, **model_kwargs)


def load_analysis_model(spec: AnalysisSpec, device: torch.device | str = "cpu", fast_init: bool = False,
                        meta: bool = False) -> AnalysisModel:
    """The model `spec` describes, in eval mode on `device`.

    fast_init=True skips weight initialisation (the values do not matter for counting operations);
    meta=True leaves it on the meta device when possible (shapes only: for receptive fields).
    """
    if spec.input_size is not None and any(v <= 0 for v in spec.input_size):
        raise InputError(f"--input_size must be three positive integers C H W, got {' '.join(map(str, spec.input_size))}")
    if spec.num_classes is not None and spec.num_classes <= 0:
        raise InputError(f"--num_classes must be positive, got {spec.num_classes}")
    if spec.weights:
        ckpt = load_checkpoint(spec.weights)
        model, info = build_from_checkpoint(ckpt, model_name=spec.model)
        pre = info.preprocess
        size = tuple(spec.input_size) if spec.input_size else (pre.channels, pre.img_size, pre.img_size)
        return AnalysisModel(model.to(device).eval(), info.model_name, info.num_classes, size,
                             f"checkpoint {spec.weights}", info.classes)
    name = spec.model or spec.default_model
    num_classes = spec.num_classes or default_num_classes(name)
    size = tuple(spec.input_size) if spec.input_size else (3, 224, 224)
    # img_size is the size the network is built for: FashionCNN's Linear depends on it; the FCN keeps its
    # 224-px pooling window whatever the analysed input (that is the point of it)
    img_size = 224 if name == "fcn_resnet18" else size[1]
    model = build_analysis_network(name, num_classes, img_size=img_size, in_channels=size[0], fast_init=fast_init or meta, meta=meta)
    source = "uninitialised weights (values do not matter for counting)" if fast_init or meta else "random initialisation"
    if not (meta and next(iter(model.parameters()), torch.empty(0)).is_meta):
        model = model.to(device)
    return AnalysisModel(model.eval(), name, num_classes, size, source)


def check_forward(am: AnalysisModel, device) -> None:
    """Run one forward pass; a shape problem becomes an InputError naming --input_size."""
    x = torch.zeros(1, *am.input_size, device=device)
    try:
        with torch.no_grad():
            am.model(x)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{am.name} cannot run on input {tuple(am.input_size)}: {first} "
                         "(fix --input_size: channels must match the model, the image large enough)") from None


def result_stem(am: AnalysisModel) -> str:
    c, h, w = am.input_size
    return f"{am.name}_{h}x{w}" + ("" if c == 3 else f"_c{c}")
