"""Receptive fields: the seed's formulas, the graph calculator against published values, and the backprop check.

Published values used:
- Araujo, Norris, Sim (2019), "Computing Receptive Fields of Convolutional Neural Networks", Distill,
  https://distill.pub/2019/computing-receptive-fields/ (table "receptive field / effective stride / effective
  padding" of TF-slim models): vgg_16 212/32/90, alexnet_v2 195/32, mobilenet_v1 315/32, resnet_v1_50 483/32,
  inception_v3 1311/32/618.
- torchvision's ResNet layout (stride on the first block of a stage), "ResNet Receptive Field Size",
  https://gist.github.com/samson-wang/a6073c18f2adf16e0ab5fb95b53db3e6: layer4 of resnet18 435, resnet34 899,
  resnet50 427, resnet101 971.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_fcn import assert_png
from torch import nn

import receptive_field
import receptive_field_backprop
from models import build_model
from utils.analysis import receptive_field as rf
from utils.analysis import rf_backprop, rf_fields, rf_trace
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread


def on_meta(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Shapes only: a model on the meta device costs neither memory nor compute."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", FutureWarning)
        return build_model(name, num_classes, **kwargs)


def final(model: nn.Module, size=(3, 224, 224)) -> rf_fields.LayerField:
    report = rf_trace.receptive_fields(model, size, device="meta")
    assert report.final is not None
    return report.final


def test_seed_chain_formulas():
    vgg16_pool5 = [(3, 1), (3, 1), (2, 2)] * 2 + [(3, 1), (3, 1), (3, 1), (2, 2)] * 3
    assert rf.calculate_RF(vgg16_pool5) == 212
    assert rf.calculate_RF([(3, 1), (3, 1), (2, 2)]) == 6
    kernels, strides = zip(*vgg16_pool5)
    assert rf.get_receptive_field(list(kernels), list(strides), 1) == 212
    assert rf.get_receptive_field(3, 1, 2) == 5                     # one dilated 3x3 conv sees 5 pixels
    assert rf.get_receptive_field([3, 3], [1, 1], [1, 2]) == 7
    with pytest.raises(ValueError):
        rf.get_receptive_field([3, 3], [1], 1)


@pytest.mark.parametrize(("name", "rf_px", "stride", "padding"), [
    ("vgg16", 212, 32, 90),            # Distill: vgg_16 212 / 32 / 90
    ("inception_v3", 1311, 32, 618),   # Distill: inception_v3 1311 / 32 / 618
    ("alexnet", 195, 32, 66),          # Distill: alexnet_v2 195 / 32 / 64; torchvision's conv1 pads 2 px (slim: VALID)
    ("resnet18", 435, 32, 217),        # gist (torchvision layout)
    ("resnet34", 899, 32, 449),
    ("resnet50", 427, 32, 213),
    ("resnet101", 971, 32, 485),
])
def test_published_receptive_fields(name, rf_px, stride, padding):
    f = final(on_meta(name))
    assert f.rf == (rf_px, rf_px) and f.stride == (stride, stride) and f.padding == (padding, padding)


def test_resnet_v1_50_slim_layout_is_483():
    """Distill's resnet_v1_50 (TF-slim) strides the LAST unit of blocks 1-3; move torchvision's strides there."""
    model = on_meta("resnet50")
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        first = stage[0]
        first.conv2.stride = (1, 1)
        if first.downsample is not None:
            first.downsample[0].stride = (1, 1)
    for stage in (model.layer1, model.layer2, model.layer3):
        last = stage[-1]
        last.conv2.stride = (2, 2)
        last.downsample = nn.MaxPool2d(1, stride=2)   # slim's 'subsample' shortcut
    f = final(model)
    assert f.rf == (483, 483) and f.stride == (32, 32)


def test_mobilenet_v1_is_315():
    """MobileNet v1 (Howard et al. 2017, Table 1) built from its layer table; Distill: mobilenet_v1 RF 315, stride 32."""
    def dw_sep(cin, cout, stride):
        return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.BatchNorm2d(cin), nn.ReLU(),
                nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU()]
    cfg = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + \
        [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
    with torch.device("meta"):
        layers = [nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU()]
        for cin, cout, s in cfg:
            layers += dw_sep(cin, cout, s)
        model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))
    report = rf_trace.receptive_fields(model, (3, 224, 224), device="meta")
    assert report.final.rf == (315, 315) and report.final.stride == (32, 32)
    assert report.output_is_global and report.covers_whole_image


def test_global_operations_are_reported():
    report = rf_trace.receptive_fields(on_meta("resnet18"), (3, 224, 224), device="meta")
    assert report.output_is_global and report.covers_whole_image
    assert "WHOLE 224x224 image" in report.summary()

    se = rf_trace.receptive_fields(on_meta("mobilenet_v3_small"), (3, 224, 224), device="meta")
    assert se.output.global_from.startswith("features.1.block.1")   # the first squeeze-excitation
    assert se.final.global_from is not None and se.final.rf == (639, 639)

    fashion = rf_trace.receptive_fields(on_meta("custom", 10, img_size=28), (3, 28, 28), device="meta")
    assert fashion.final.rf == (22, 22) and fashion.final.stride == (8, 8)
    assert fashion.output.global_from.startswith("classifier.1")   # the Linear on the flattened map
    assert fashion.covers_whole_image


def test_group_norm_makes_the_field_global():
    report = rf_trace.receptive_fields(on_meta("resnet18", norm_type="GN"), (3, 64, 64), device="meta")
    assert report.output.global_from.startswith("bn1")


class TwoPaths(nn.Module):
    """Two 3x3 branches whose fields are shifted by one pixel: unit i sees [i-1, i+1] and [i-2, i]."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=2)

    def forward(self, x):
        n = x.shape[-1]
        return self.a(x) + self.b(x)[..., :n, :n]


def test_misaligned_paths_are_united_and_flagged():
    report = rf_trace.receptive_fields(TwoPaths(), (3, 16, 16))
    out = report.output
    assert out.local[0].size == 4 and out.local[0].start == -2      # union [i-2, i+1]
    assert report.misaligned and "centres differ by 1 px" in report.misaligned[0]


def test_backprop_equals_analytic_field_chain_interior():
    """AlexNet's features at 320 px: the unit in the middle has its whole 195-px field inside the image."""
    torch.manual_seed(0)
    features = build_model("alexnet", 1000).features.eval()
    report = rf_trace.receptive_fields(features, (3, 320, 320))
    local = report.output.local
    pixel = (4, 4)
    assert rf_backprop.is_interior(local, pixel, (320, 320)) == (True, True)
    grad = rf_backprop.input_gradient(rf_backprop.theoretical_model(features), torch.ones(1, 3, 320, 320), pixel)
    box = rf_backprop.support_box(grad)
    assert box == rf_backprop.analytic_box(local, pixel, (320, 320)) == (62, 62, 256, 256)
    assert box[2] - box[0] + 1 == 195


def test_backprop_script_fcn_interior_and_border(random_resnet18_ckpt, tmp_path, capsys):
    """FCN ResNet18 (residual) from a resnet18 checkpoint at 64 px (2x2 score pool: RF 467, stride 32, padding 217):
    on a 96x480 image unit (0, 7) sees columns 7-473 (interior) and is clipped to rows 0-95."""
    ckpt = random_resnet18_ckpt
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 480, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "rf"
    assert receptive_field_backprop.main(["--image", str(image), "--weights", str(ckpt), "--pixel", "0", "7",
                                          "--out_dir", str(out), "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    a = res["analytic"]
    assert (a["rf"], a["stride"], a["padding"]) == (467, 32, 217) and a["interior_yx"] == [False, True]
    box = res["theoretical"]["box"]
    assert res["theoretical"]["matches_analytic"] and box == a["box"]
    assert (box["top"], box["left"], box["bottom"], box["right"]) == (0, 7, 95, 473) and box["width"] == 467
    eff = res["effective"]["support_box"]   # the real weights never reach outside the theoretical field
    assert eff["left"] >= box["left"] and eff["right"] <= box["right"]
    folder = out / "wide"
    for name in ("max_activation.png", "receptive_field.png"):
        assert_png(folder / name)
    for name in ("theoretical", "effective", "net"):
        grad = np.load(folder / f"{name}_grad.npy")
        assert grad.shape == (3, 96, 480) and np.abs(grad).max() > 0
    theoretical = np.abs(np.load(folder / "theoretical_grad.npy")).sum(0)
    assert theoretical[:, 7:474].min() > 0 and theoretical[:, :7].max() == 0 and theoretical[:, 474:].max() == 0
    with pytest.raises(InputError, match="outside the 2x14 score map"):
        receptive_field_backprop.main(["--image", str(image), "--weights", str(ckpt), "--pixel", "5", "0",
                                       "--out_dir", str(out)])


def test_cli_table_json_and_files(tmp_path, capsys):
    out = tmp_path / "rf"
    assert receptive_field.main(["--model", "resnet18", "--json", "--out_dir", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["final_feature_map"]["rf"] == [435, 435] and res["output"]["covers_whole_image"]
    assert (out / "resnet18_224x224.txt").read_text().startswith("receptive fields of resnet18")
    assert receptive_field.main(["--model", "fcn_resnet18", "--input_size", "3", "448", "448", "--out_dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "8x8 units, RF 627 px, stride 32 px, padding 217 px" in text and "no global operation" in text
    with pytest.raises(InputError, match="cannot run on input"):
        receptive_field.main(["--model", "alexnet", "--input_size", "3", "16", "16", "--out_dir", str(out)])


def test_functional_ops_and_views_are_followed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            y = F.max_pool2d(self.conv(x), 2)                       # functional pooling
            y = y.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # layout round trip
            y = F.pad(y, (1, 1, 1, 1))                               # explicit padding
            return F.avg_pool2d(y, 3, stride=1)

    report = rf_trace.receptive_fields(Net(), (3, 32, 32))
    ax = report.output.local[0]
    assert (ax.size, ax.stride, ax.padding) == (8, 2, 3)
