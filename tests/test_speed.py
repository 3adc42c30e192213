"""Fast by default on a CPU: the eval geometry (--crop_pct), grayscale networks (--in_channels 1), the small-image
network `speednet`, --precision/--memory_format auto, the --time_budget re-estimate and the benchmarks' GFLOP/s."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_image_folder, run_main
from PIL import Image

from utils.data.datasets import DataSpec, native_image_size, resolve_crop_pct
from utils.data.preprocess import Preprocess, eval_transform
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- --crop_pct


def test_crop_pct_sets_the_eval_resize_and_old_preprocessing_keeps_its_own():
    assert (Preprocess.for_size(224).resize, Preprocess.for_size(224).crop_pct) == (256, 0.875)
    assert [Preprocess.for_size(s).resize for s in (28, 48, 56)] == [32, 55, 64]  # the seed's formula, as before
    assert Preprocess.for_size(28, crop_pct=1.0).resize == 28
    # a checkpoint or artifact from before the field: its resize is the geometry, nothing is recomputed
    legacy = {"img_size": 28, "resize": 32, "mean": [0.5], "std": [0.25], "channels": 1, "interpolation": "bilinear"}
    pre = Preprocess.from_dict(legacy)
    assert pre.crop_pct is None and pre.resize == 32
    img = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28), "L")
    old, new = eval_transform(img, pre), eval_transform(img, Preprocess.from_dict({**legacy, "resize": 28, "crop_pct": 1.0}))
    assert old.shape == new.shape == (1, 28, 28)
    assert np.array_equal(new[0], (np.asarray(img, np.float32) / 255 - np.float32(0.5)) / np.float32(0.25))  # untouched
    assert not np.allclose(old, new)  # resize 32 + crop 28: the border is cut, the rest resampled
    with pytest.raises(InputError, match="'crop_pct' must be img_size / resize"):
        Preprocess.from_dict({**legacy, "crop_pct": 1.0})  # an edited file: 28 / 1.0 is not 32
    with pytest.raises(InputError, match="'crop_pct' must be a number in"):
        Preprocess.from_dict({**legacy, "crop_pct": 1.5})


def test_crop_pct_defaults_to_1_only_when_the_images_already_have_the_input_size(tmp_path, fashion_root):
    assert native_image_size(DataSpec(None, str(fashion_root))) == 28
    squares = tmp_path / "squares"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (squares / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (28, 28), 40 * i).save(squares / split / name / f"{i}.png")
    assert native_image_size(DataSpec(str(squares))) == 28
    assert native_image_size(DataSpec(str(make_image_folder(tmp_path / "photos")))) is None  # photos of mixed sizes
    assert resolve_crop_pct(None, 28, 28) == 1.0 and resolve_crop_pct(None, 56, 28) == 0.875
    assert resolve_crop_pct(None, 28, None) == 0.875 and resolve_crop_pct(0.9, 28, 28) == 0.9  # the flag wins


def test_resuming_a_checkpoint_from_before_crop_pct_keeps_its_resize(trained_run, tmp_path):
    run = tmp_path / "FashionMNIST" / "custom"
    shutil.copytree(trained_run, run)
    ckpt = torch.load(run / "last.pth", weights_only=True)
    del ckpt["args"]["crop_pct"], ckpt["preprocess"]["crop_pct"]
    ckpt["preprocess"]["resize"] = 32  # how train.py saved a 28 px run before --crop_pct
    torch.save(ckpt, run / "last.pth")
    proc = run_main("train.py", "--resume", str(run / "last.pth"), "--max_epoch", "3", "--quiet", "--device", "cpu",
                    "--num_workers", "0", "--data_root", ckpt["args"]["data_root"])
    assert proc.returncode == 0, proc.stderr
    assert "eval resize 32 -> centre crop 28 (crop_pct 0.875)" in proc.stdout
    resumed = torch.load(run / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["preprocess"]["resize"] == 32 and resumed["args"]["crop_pct"] == 0.875
