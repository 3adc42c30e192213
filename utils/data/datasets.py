"""Datasets and transforms: Fashion-MNIST (found locally, from Debian, or downloaded) or an image folder."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision import datasets, transforms

from utils.data.augment import Augment, auto_augment_policy, resolve_augment
from utils.errors import InputError
from utils.io import atomic_path
from utils.data.preprocess import IMAGE_EXTENSIONS, Preprocess, eval_transform, load_image

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class ConvertMode:
    """Convert a PIL image to RGB or L (picklable, so it works in DataLoader workers)."""

    def __init__(self, channels: int):
        self.mode = "RGB" if channels == 3 else "L"

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert(self.mode) if img.mode != self.mode else img


class EvalTransform:
    """Callable wrapper of the shared eval transform (PIL -> normalised CHW tensor)."""

    def __init__(self, pre: Preprocess):
        self.pre = pre

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(eval_transform(img, self.pre))


def build_transform(pre: Preprocess, train: bool, augment: Augment | None = None) -> transforms.Compose | EvalTransform:
    """Train: the augmentation policy (default: --augment auto) scaled to `pre.img_size`, as per-image PIL
    transforms. Eval: the one shared eval transform."""
    if not train:
        return EvalTransform(pre)
    augment = augment or resolve_augment("auto", pre.img_size)
    steps = [ConvertMode(pre.channels)]
    if augment.crop_scale:
        steps.append(transforms.RandomResizedCrop(pre.resize, scale=augment.crop_scale))
    else:
        steps.append(transforms.Resize(pre.resize))
    if augment.rotation:
        steps.append(transforms.RandomRotation(augment.rotation))
    if augment.flip:
        steps.append(transforms.RandomHorizontalFlip(augment.flip))
    steps.append(transforms.CenterCrop(pre.img_size))
    if augment.crop_padding:
        steps.append(transforms.RandomCrop(pre.img_size, padding=augment.crop_padding))
    if augment.auto_augment != "none":
        steps.append(auto_augment_policy(augment.auto_augment))
    steps += [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]
    if augment.erasing:
        steps.append(transforms.RandomErasing(augment.erasing, value=0))
    return transforms.Compose(steps)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _raw_present(raw: Path) -> bool:
    return all((raw / f).is_file() or (raw / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES)


def ensure_fashion_mnist(data_root: str | Path) -> Path:
    """Make the four Fashion-MNIST files available under `<data_root>/FashionMNIST/raw/`.

    Order: files already there; Debian's dataset-fashion-mnist package; torchvision's download.
    """
    root = Path(data_root)
    raw = root / "FashionMNIST" / "raw"
    if _raw_present(raw):
        return root
    if DEBIAN_FASHION_MNIST.is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        for name in FASHION_MNIST_FILES:
            src = next((p for p in (DEBIAN_FASHION_MNIST / f"{name}.gz", DEBIAN_FASHION_MNIST / name) if p.is_file()), None)
            if src is None:
                break
            with atomic_path(raw / name) as tmp:
                if src.suffix == ".gz":  # Debian rewrote the gzip headers, so decompress instead of copying
                    with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                        shutil.copyfileobj(fin, fout)
                else:
                    shutil.copyfile(src, tmp)
        if _raw_present(raw):
            return root
    try:
        datasets.FashionMNIST(str(root), train=True, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError when offline
        raise InputError(
            f"Fashion-MNIST not found and could not be downloaded ({type(e).__name__}): put the four files "
            f"{', '.join(f + '.gz' for f in FASHION_MNIST_FILES)} in {raw}/ "
            "or run 'apt-get install dataset-fashion-mnist'"
        ) from None
    return root


def _idx_problem(data: bytes, header_only: bool = False, size: int = 0) -> str | None:
    """What is wrong with an IDX file (Fashion-MNIST's format: magic, dimensions, then uint8 values), or None."""
    if len(data) < 8 or data[:2] != b"\0\0" or data[2] != 8 or not 1 <= data[3] <= 3:
        return "not an IDX file of uint8 values"
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        return "its header is cut off"
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    actual = size if header_only else len(data)
    if actual != expected:
        return f"{actual} bytes of data where its header ({' x '.join(map(str, dims))}) needs {expected}"
    return None


def verify_fashion_files(raw: Path) -> None:
    """Check the four files before torchvision reads them: a truncated or corrupt file (or .gz archive) is one line
    naming it, instead of torchvision's attempt to download a replacement. Extracted files: header and size only;
    archives that torchvision still has to extract: decompressed in full (once; later runs find the extracted file)."""
    for name in FASHION_MNIST_FILES:
        plain, packed = raw / name, raw / f"{name}.gz"
        try:
            if plain.is_file():
                with open(plain, "rb") as f:
                    problem = _idx_problem(f.read(16), header_only=True, size=plain.stat().st_size)
                path = plain
            elif packed.is_file():
                path = packed
                with gzip.open(packed, "rb") as f:
                    problem = _idx_problem(f.read())
            else:
                continue
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut archive an EOFError
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise InputError(f"Fashion-MNIST file {path} is truncated or corrupt ({problem}); fix: delete it and put "
                             f"the original {path.name} there (or delete it and let the run download it)")


def fashion_mnist(data_root: str | Path, train: bool, transform=None) -> datasets.FashionMNIST:
    root = ensure_fashion_mnist(data_root)
    verify_fashion_files(Path(root) / "FashionMNIST" / "raw")
    try:
        return datasets.FashionMNIST(str(root), train=train, download=True, transform=transform)
    except RuntimeError as e:
        reason = " ".join(str(e).split())
        raise InputError(f"Fashion-MNIST files in {root}/FashionMNIST/raw are unusable: {reason}") from None


# ----------------------------------------------------------------------------- image folders


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder that reads with the shared loader (EXIF, any mode) and names bad files."""

    def __init__(self, root: str, transform=None, channels: int = 3):
        self.channels = channels
        super().__init__(root, transform=transform, loader=self._load)

    def _load(self, path: str) -> Image.Image:
        return load_image(path, self.channels)

    def find_classes(self, directory: str):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise InputError(f"no class folders in {directory}: expected {directory}/<class_name>/<image files>")
        for c in classes:
            if not any(Path(p).suffix.lower() in IMAGE_EXTENSIONS for p in os.listdir(os.path.join(directory, c))):
                raise InputError(f"class folder {os.path.join(directory, c)} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        return classes, {c: i for i, c in enumerate(classes)}


def val_folder(dataset: str | Path) -> Path:
    """The validation split of an image-folder dataset: `val/`, or `test/` when there is no `val/`."""
    root = Path(dataset)
    return root / "val" if (root / "val").is_dir() else root / "test"


def folder_splits(dataset: str | Path) -> tuple[Path, Path]:
    """Return (train_dir, val_dir) of an image-folder dataset; `test/` stands in for a missing `val/`."""
    root = Path(dataset)
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root} (give --dataset a folder holding train/ and val/)")
    train_dir = root / "train"
    val_dir = val_folder(root)
    if not train_dir.is_dir():
        raise InputError(f"{root} has no train/ folder: expected {root}/train/<class>/<images> and {root}/val/<class>/<images>")
    if not val_dir.is_dir():
        raise InputError(f"{root} has no val/ (or test/) folder: expected {root}/val/<class>/<images>")
    return train_dir, val_dir


def _ends_with_jpeg_eoi(path: str) -> bool:
    """A complete JPEG ends with the end-of-image marker FF D9 (files with trailing bytes get decoded instead)."""
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read(2) == b"\xff\xd9"


def verify_images(ds: datasets.ImageFolder) -> None:
    """Open every image once so that an unreadable file is reported by name before training starts."""
    for path, _ in ds.samples:
        try:
            with Image.open(path) as img:
                fmt = img.format
                img.verify()
            if fmt == "JPEG" and not _ends_with_jpeg_eoi(path):
                with Image.open(path) as img:  # verify() only parses JPEG headers: decode a file cut short
                    img.load()
        except Exception as e:
            raise InputError(f"cannot read image {path}: {e} (remove or replace the file)") from None


# ----------------------------------------------------------------------------- entry points


@dataclass
class DataSpec:
    """What dataset to use: Fashion-MNIST under data_root, or an image-folder tree."""

    dataset: str | None = None
    data_root: str = "data"

    @property
    def name(self) -> str:
        return "FashionMNIST" if not self.dataset else Path(self.dataset).resolve().name


def build_datasets(spec: DataSpec, pre: Preprocess, verify: bool = True, augment: Augment | None = None):
    """Train and validation datasets plus class names. Validation uses the shared eval transform."""
    train_tf, val_tf = build_transform(pre, train=True, augment=augment), build_transform(pre, train=False)
    if not spec.dataset:
        return (fashion_mnist(spec.data_root, True, train_tf), fashion_mnist(spec.data_root, False, val_tf),
                list(FASHION_MNIST_CLASSES))
    train_dir, val_dir = folder_splits(spec.dataset)
    train_ds = CheckedImageFolder(str(train_dir), train_tf, pre.channels)
    val_ds = CheckedImageFolder(str(val_dir), val_tf, pre.channels)
    if train_ds.classes != val_ds.classes:
        only_train = sorted(set(train_ds.classes) - set(val_ds.classes))
        only_val = sorted(set(val_ds.classes) - set(train_ds.classes))
        raise InputError(f"class folders differ between {train_dir} and {val_dir}: "
                         f"only in train: {only_train or 'none'}, only in val: {only_val or 'none'}")
    if verify:
        verify_images(train_ds)
        verify_images(val_ds)
    return train_ds, val_ds, list(train_ds.classes)


def build_eval_dataset(spec: DataSpec, pre: Preprocess, split: str = "val"):
    """The evaluation split: Fashion-MNIST's test set, or the folder's val/ (test/) or named split."""
    tf = build_transform(pre, train=False)
    if not spec.dataset:
        return fashion_mnist(spec.data_root, split == "train", tf), list(FASHION_MNIST_CLASSES), "test" if split != "train" else "train"
    train_dir, val_dir = folder_splits(spec.dataset)
    folder = {"train": train_dir, "val": val_dir}.get(split, Path(spec.dataset) / split)
    if not folder.is_dir():
        raise InputError(f"split folder not found: {folder}")
    ds = CheckedImageFolder(str(folder), tf, pre.channels)
    verify_images(ds)
    return ds, list(ds.classes), folder.name


# ----------------------------------------------------------------------------- real test images as files


def save_test_images(data_root: str | Path, out_dir: str | Path, count: int = 10, start: int = 0) -> list[Path]:
    """Write Fashion-MNIST test images `start`..`start+count-1` as 28x28 grayscale PNGs named <index>_<class>.png.

    Gives predict.py real inputs with known labels (the label is in the file name); save_test_images.py is its CLI.
    """
    ds = fashion_mnist(data_root, train=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(start, min(start + count, len(ds))):
        img, label = ds[i]
        name = FASHION_MNIST_CLASSES[label].replace("/", "_").replace(" ", "_")
        path = out / f"{i:05d}_{name}.png"
        with atomic_path(path) as tmp:
            img.save(tmp)
        written.append(path)
    return written
