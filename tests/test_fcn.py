"""Fully convolutional ResNet18 (models/fcn.py) and fcn_resnet18.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcn_resnet18
from models import build_model, model_kwargs
from models.fcn import fcn_from_resnet
from utils.analysis.fcn import largest_region_box
from utils.checkpoint import save_checkpoint
from utils.data.preprocess import Preprocess
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save_random_resnet18_checkpoint(path: Path, img_size: int = 64, classes=("cat", "dog", "fish")) -> Path:
    """A randomly initialised resnet18 in the project checkpoint format (what train.py writes)."""
    torch.manual_seed(0)
    kwargs = model_kwargs(img_size, small_input="off")
    model = build_model("resnet18", len(classes), **kwargs)
    save_checkpoint({"model_name": "resnet18", "num_classes": len(classes), "classes": list(classes),
                 "preprocess": Preprocess.for_size(img_size).to_dict(), "model_kwargs": kwargs, "epoch": 0,
                 "model": model.state_dict(), "optimizer": None, "scaler": None, "ema": None, "best_acc1": 0.0,
                 "step": 0, "history": [], "args": {}, "rng": None, "torch_version": str(torch.__version__)}, path)
    return path


def assert_png(path) -> None:
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


@pytest.fixture(scope="module")
def resnet_and_fcn():
    torch.manual_seed(0)
    resnet = build_model("resnet18", 10).eval()
    return resnet, fcn_from_resnet(resnet).eval()


def test_fcn_equals_resnet18_logits_at_224(resnet_and_fcn):
    resnet, fcn = resnet_and_fcn
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref, out = resnet(x), fcn(x)
    assert out.shape == (2, 10, 1, 1)
    assert torch.allclose(out.flatten(1), ref, atol=1e-5, rtol=0)
    # the linear head is copied, not re-initialised
    assert torch.equal(fcn.fc.weight[:, :, 0, 0], resnet.fc.weight) and torch.equal(fcn.fc.bias, resnet.fc.bias)


def test_registry_fcn_loads_a_resnet18_state_dict(resnet_and_fcn):
    resnet, _ = resnet_and_fcn
    fcn = build_model("fcn_resnet18", 10, img_size=224).eval()
    fcn.load_state_dict(resnet.state_dict(), strict=True)  # fc.weight (10, 512) is reshaped to (10, 512, 1, 1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(fcn(x).flatten(1), resnet(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("hw", "map_hw"), [((320, 480), (4, 9)), ((448, 448), (8, 8)), ((100, 64), (1, 1)), ((1, 1), (1, 1))])
def test_score_map_sizes(resnet_and_fcn, hw, map_hw):
    """Larger inputs give a map of (ceil(H/32) - 6) x (ceil(W/32) - 6); smaller ones pool what exists."""
    _, fcn = resnet_and_fcn
    with torch.no_grad():
        out = fcn(torch.randn(1, 3, *hw))
    assert out.shape == (1, 10, *map_hw)
    assert torch.isfinite(out).all()


def test_small_input_map_is_the_mean_of_what_exists(resnet_and_fcn):
    resnet, fcn = resnet_and_fcn
    x = torch.randn(1, 3, 96, 160)  # 3x5 feature map, smaller than the 7x7 window: pool all of it = global pool
    with torch.no_grad():
        assert torch.allclose(fcn(x).flatten(1), resnet(x), atol=1e-5, rtol=0)


def test_largest_region_box_and_flat_map():
    centers = np.arange(5) * 32.0 + 16
    score = np.zeros((5, 5))
    score[1:3, 1:4] = 5.0   # 6 units
    score[4, 4] = 6.0       # 1 unit, the maximum, but a smaller region
    box, note = largest_region_box(score, 0.5, centers, centers, 32, (160, 160))
    assert box == (32, 32, 96, 128)
    assert "6 of 25" in note
    assert largest_region_box(np.ones((3, 3)), 0.5, centers[:3], centers[:3], 32, (96, 96))[0] is None
    assert largest_region_box(np.ones((1, 1)), 0.5, centers[:1], centers[:1], 32, (32, 32))[0] is None


def test_fcn_script_with_project_checkpoint(random_resnet18_ckpt, tmp_path, capsys):
    ckpt = random_resnet18_ckpt  # save_random_resnet18_checkpoint's, at 64 px
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 330, 3), dtype=np.uint8)).save(tmp_path / "scene.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "tiny.png")
    out = tmp_path / "fcn"
    assert fcn_resnet18.main(["--image", str(tmp_path / "scene.png"), "--weights", str(ckpt), "--out_dir", str(out),
                              "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["score_map_hw"] == [6, 10]           # stride 32, 2x2 window at the 64-px training size
    assert res["receptive_field"] == {"size": 467, "stride": 32, "padding": 217}
    assert [r["class"] for r in res["fcn_top"]][0] == res["predicted_class"]
    assert {r["class"] for r in res["fcn_top"]} == {"cat", "dog", "fish"} == {r["class"] for r in res["standard_top"]}
    assert abs(sum(r["prob"] for r in res["standard_top"]) - 1) < 1e-5
    t, left, b, r = res["region_box"]
    assert 0 <= t <= b < 200 and 0 <= left <= r < 330
    for name in ("score_map.png", "overlay.png"):
        assert_png(out / "scene" / name)
    assert json.loads((out / "scene" / "result.json").read_text())["predicted_class"] == res["predicted_class"]

    # an image of the training size gives a 1x1 map: no region, said so, nothing crashes
    assert fcn_resnet18.main(["--image", str(tmp_path / "tiny.png"), "--weights", str(ckpt), "--out_dir", str(out),
                              "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "score map 1x1" in text and "region box (top, left, bottom, right): none" in text
    assert_png(out / "tiny" / "overlay.png")


def test_fcn_script_rejects_other_checkpoints_and_missing_imagenet_weights(tmp_path, monkeypatch):
    img = tmp_path / "a.png"
    Image.new("RGB", (50, 40), "red").save(img)
    ckpt = tmp_path / "custom.pth"
    save_checkpoint({"model_name": "custom", "model": {}, "num_classes": 2, "classes": ["a", "b"],
                     "preprocess": Preprocess.for_size(28).to_dict()}, ckpt)
    with pytest.raises(InputError, match="needs a resnet18 checkpoint"):
        fcn_resnet18.main(["--image", str(img), "--weights", str(ckpt), "--out_dir", str(tmp_path)])
    # no ImageNet weights in an empty torch hub cache and no network: one clear error saying where to put the file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(InputError, match=r"cannot load ImageNet weights for resnet18 .*put it at .*resnet18-"):
        fcn_resnet18.main(["--image", str(img), "--out_dir", str(tmp_path)])
