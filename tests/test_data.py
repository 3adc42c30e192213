"""Data: the shared eval transform equals torchvision's, datasets load, and every bad input is one clear line (exit 2)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from conftest import run_main
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from utils import cli
from utils.data.datasets import CheckedImageFolder, DataSpec, build_datasets, folder_splits
from utils.data.fashion_mnist import FASHION_MNIST_CLASSES
from utils.data.preprocess import Preprocess, eval_transform
from utils.errors import InputError


def torchvision_eval(img: Image.Image, pre: Preprocess) -> np.ndarray:
    tf = transforms.Compose([transforms.Resize(pre.resize), transforms.CenterCrop(pre.img_size), transforms.ToTensor(),
                             transforms.Normalize(pre.mean, pre.std)])
    return tf(img.convert("RGB" if pre.channels == 3 else "L")).numpy()


@pytest.mark.parametrize("mode,size,img_size,channels", [
    ("RGB", (37, 23), 28, 3),  # odd, landscape, upsampled
    ("RGB", (199, 301), 224, 3),  # odd, portrait, at the ImageNet recipe (resize 256)
    ("L", (50, 61), 28, 1),  # grayscale model
    ("L", (29, 31), 32, 3),  # grayscale file for an RGB model
    ("RGB", (10, 7), 28, 3),  # tiny
])
def test_eval_transform_equals_torchvision(mode, size, img_size, channels):
    rng = np.random.default_rng(sum(size))
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    img = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)
    pre = Preprocess.for_size(img_size, channels)
    ours = eval_transform(img, pre)
    reference = torchvision_eval(img, pre)
    assert ours.shape == reference.shape == (channels, img_size, img_size)
    assert ours.dtype == np.float32
    assert np.abs(ours - reference).max() <= 1e-6


def test_fashion_mnist_datasets(fashion_root):
    pre = Preprocess.for_size(28)
    train_set, val_set, classes = build_datasets(DataSpec(None, str(fashion_root)), pre)
    assert classes == FASHION_MNIST_CLASSES
    assert (len(train_set), len(val_set)) == (320, 160)
    x, y = val_set[0]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    img = Image.fromarray(val_set.data[0].numpy(), "L")
    assert np.array_equal(x.numpy(), eval_transform(img, pre))  # validation uses exactly the shared eval transform


def test_image_folder_datasets_and_test_split_fallback(image_folder):
    assert folder_splits(image_folder) == (image_folder / "train", image_folder / "val")
    shutil.move(image_folder / "val", image_folder / "test")
    assert folder_splits(image_folder)[1] == image_folder / "test"
    train_set, val_set, classes = build_datasets(DataSpec(str(image_folder)), Preprocess.for_size(32))
    assert classes == ["cat", "dog", "fish"] and len(train_set) == len(val_set) == 18
    assert train_set[0][0].shape == (3, 32, 32)
    gray = CheckedImageFolder(str(image_folder / "test"), transform=None, channels=1)
    assert gray[0][0].mode == "L"


def test_reading_a_folder_names_broken_files(image_folder):
    CheckedImageFolder(str(image_folder / "train"))  # the fixture's images are fine: every file is checked on reading
    png = image_folder / "train" / "cat" / "cat_0.png"
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cat_0.png"):
        CheckedImageFolder(str(image_folder / "train"))
    png.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cat_0.png"):
        CheckedImageFolder(str(image_folder / "train"))


class _FailingDataset(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        raise InputError(f"cannot read image broken_{i}.jpg: image file is truncated")


def _iterate_in_a_worker() -> int:
    for _ in DataLoader(_FailingDataset(), num_workers=1):
        pass
    return 0


def test_input_error_from_a_dataloader_worker_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.run(_iterate_in_a_worker)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: cannot read image broken_0.jpg: image file is truncated\n"


# ----------------------------------------------------------------------------- bad input through train.py


def train_fails(tmp_path, *args: str) -> str:
    """Run train.py's main with bad input (in this process, through utils.cli.run as `python train.py` runs it; real
    processes: tests/test_train.py, tests/test_run_safety.py); assert exit code 2, one stderr line, no traceback;
    return that line."""
    proc = run_main("train.py", *args, "--img_size", "32", "--max_epoch", "1", "--path_to_save", str(tmp_path / "out"),
                    "--quiet", "--device", "cpu")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert not (tmp_path / "out").exists()  # nothing written for a run that could not start
    return lines[0]


def test_missing_dataset_path(tmp_path):
    line = train_fails(tmp_path, "--dataset", str(tmp_path / "nowhere"))
    assert "not found" in line and str(tmp_path / "nowhere") in line


def test_dataset_without_train_folder(tmp_path, image_folder):
    shutil.rmtree(image_folder / "train")
    line = train_fails(tmp_path, "--dataset", str(image_folder))
    assert "no train/" in line and str(image_folder) in line


def test_dataset_with_train_only_is_split(image_folder):
    shutil.rmtree(image_folder / "val")  # train/ alone: split per class (tests/test_splits_balance.py has the details)
    train_set, val_set, classes = build_datasets(DataSpec(str(image_folder), val_fraction=0.2), Preprocess.for_size(32))
    assert classes == ["cat", "dog", "fish"] and (len(train_set), len(val_set)) == (15, 3)


def test_class_folders_differ_between_splits(tmp_path, image_folder):
    (image_folder / "train" / "bird").mkdir()
    shutil.copy(image_folder / "train" / "cat" / "cat_0.png", image_folder / "train" / "bird" / "bird_0.png")
    line = train_fails(tmp_path, "--dataset", str(image_folder))
    assert "differ: only in" in line and f"only in {image_folder / 'train'}: ['bird']" in line


def test_class_folder_without_images(tmp_path, image_folder):
    for split in ("train", "val"):
        (image_folder / split / "bird").mkdir()
        (image_folder / split / "bird" / "notes.txt").write_text("no pictures here")
    line = train_fails(tmp_path, "--dataset", str(image_folder))
    assert "has no images" in line and str(image_folder / "train" / "bird") in line


def test_truncated_jpeg_is_named_before_training(tmp_path, image_folder):
    # a JPEG cut short keeps valid headers, so Image.verify() alone would accept it
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    broken = image_folder / "train" / "dog" / "dog_broken.jpg"
    broken.write_bytes(buf.getvalue()[: int(len(buf.getvalue()) * 0.8)])
    with Image.open(broken) as img:
        img.verify()  # the premise: headers intact
    line = train_fails(tmp_path, "--dataset", str(image_folder))  # default --num_workers
    assert str(broken) in line and "truncated" in line


def test_missing_fashion_mnist_offline_names_the_folder_and_the_package(tmp_path, monkeypatch):
    import urllib.request

    import utils.data.fashion_mnist as fashion

    empty = tmp_path / "empty_root"
    empty.mkdir()
    for name in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):  # offline: every download is refused
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "")
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's cached opener: built anew, with these proxies
    # point the Debian package location at an empty place, so the result does not depend on this machine's packages
    monkeypatch.setattr(fashion, "DEBIAN_FASHION_MNIST", tmp_path / "no_debian_package")
    proc = run_main("train.py", "--data_root", str(empty), "--path_to_save", str(tmp_path / "out"), "--quiet",
                    "--num_workers", "0")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(empty / "FashionMNIST" / "raw") in lines[0]
    assert "apt-get install dataset-fashion-mnist" in lines[0]
    assert "train-images-idx3-ubyte.gz" in lines[0]
