"""Model registry: every model builds and runs at 28 and 224 px, norm swapping, errors, FashionCNN size, offline --pretrained."""

from __future__ import annotations

import pytest
import torch
from conftest import run_main
from torch import nn

from models import MODEL_NAMES, build_model, model_kwargs
from models.fashion_cnn import FashionCNN
from models.norm import GroupNorm2d, NoNorm
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread


def _forward(model: nn.Module, size: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(torch.randn(1, 3, size, size))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_and_runs_at_28_and_224(name):
    torch.manual_seed(0)
    for size, num_classes in ((28, 3), (28, 10), (224, 10)):
        model = build_model(name, num_classes, **model_kwargs(size))
        logits = _forward(model, size)
        assert logits.shape == (1, num_classes), (name, size, num_classes)
        assert torch.isfinite(logits).all(), (name, size)
        # the classifier really has num_classes outputs (not a 1000-way ImageNet head sliced later)
        last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        assert last_linear.out_features == num_classes


def test_small_input_uses_stride_1_stem_for_resnet():
    small = build_model("resnet18", 10, **model_kwargs(28))
    large = build_model("resnet18", 10, **model_kwargs(224))
    assert small.conv1.stride == (1, 1) and small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert large.conv1.stride == (2, 2) and isinstance(large.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_norm_type_really_swaps_the_layers(name):
    # the layers, not their values, are checked: built on the meta device (no weight initialisation); the forward
    # passes of GN and none models run in test_gn_and_none_models_run
    with torch.device("meta"):
        bn = build_model(name, 10, **model_kwargs(28, "BN"))
        gn = build_model(name, 10, **model_kwargs(28, "GN"))
        none = build_model(name, 10, **model_kwargs(28, "none"))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert n_bn > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    assert sum(isinstance(m, GroupNorm2d) for m in gn.modules()) == n_bn  # one GroupNorm per former BatchNorm
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in none.modules())
    assert sum(isinstance(m, NoNorm) for m in none.modules()) == n_bn
    for m in gn.modules():
        if isinstance(m, GroupNorm2d):
            assert m.num_channels % m.num_groups == 0


@pytest.mark.parametrize("name", ["custom", "resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_gn_and_none_models_run(name):
    for norm in ("GN", "none"):
        logits = _forward(build_model(name, 3, **model_kwargs(28, norm)), 28)
        assert logits.shape == (1, 3) and torch.isfinite(logits).all(), (name, norm)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(InputError) as info:
        build_model("resnet19", 10)
    message = str(info.value)
    assert "resnet19" in message
    for name in MODEL_NAMES:
        assert name in message


def test_fashion_cnn_at_224_has_the_seeds_parameter_count():
    model = build_model("custom", 10, **model_kwargs(224))
    count = sum(p.numel() for p in model.parameters())
    convs = 3 * 16 * 9 + 16 * 32 * 9 + 32 * 64 * 9  # 3x3 convs without bias (BatchNorm follows)
    norms = 2 * (16 + 32 + 64)  # BatchNorm weight + bias
    head = (64 * 28 * 28) * 256 + 256 + 256 * 10 + 10  # 224 / 8 = 28
    assert count == convs + norms + head == 12_871_578
    assert round(count / 1e6, 2) == 12.87
    assert isinstance(model, FashionCNN)


def test_fashion_cnn_rejects_tiny_inputs():
    with pytest.raises(ValueError):
        FashionCNN(10, img_size=4)


def test_pretrained_offline_fails_fast_with_one_line_naming_the_cache_file(tmp_path, image_folder, monkeypatch):
    import urllib.request

    torch_home = tmp_path / "torch_home"
    # an unreachable proxy makes the download fail at once even on a machine with internet
    offline = {"TORCH_HOME": str(torch_home), "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    for key, value in offline.items():
        monkeypatch.setenv(key, value)
    # in this process: urlopen's shared opener reads the proxy variables when it is built, so build it afresh
    monkeypatch.setattr(urllib.request, "_opener", None)
    proc = run_main("train.py", "--model", "resnet18", "--pretrained", "--dataset", str(image_folder), "--img_size", "32",
                    "--num_workers", "0", "--max_epoch", "1", "--path_to_save", str(tmp_path / "runs"), "--quiet",
                    "--cache_dir", str(tmp_path / "cache"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in lines[0]
    assert "resnet18" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pth"))
