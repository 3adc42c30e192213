"""Datasets and transforms: the per-image PIL transforms (`build_transform`), image-folder datasets
(`CheckedImageFolder`, `folder_splits`) and the entry points that pick Fashion-MNIST or an image folder
(`DataSpec`, `build_datasets`, `build_eval_dataset`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from utils.data.augment import Augment, auto_augment_policy, resolve_augment
from utils.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_SIZE, fashion_mnist
from utils.data.folders import FolderScan, check_disjoint, check_listed, check_same_classes, report_bad_images, scan_folder
from utils.data.formats import has_image_extension, is_ignored_name
from utils.data.preprocess import SEED_CROP_PCT, Preprocess, eval_transform, load_image
from utils.data.splits import from_record, split_source, stratified_split
from utils.errors import InputError


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


# ----------------------------------------------------------------------------- image folders


class CheckedImageFolder(Dataset):
    """An image folder listed by the rules of utils.data.folders (exact files, links inside the class only, no junk,
    every Pillow format) and read with the shared loader (EXIF, any mode). Keeps torchvision ImageFolder's attributes
    (`samples`, `targets`, `imgs`, `classes`, `class_to_idx`), which the tensor pipeline and the cache read.

    Built from a root (scanned and checked here; unreadable files raise unless `skip_bad`) or from a FolderScan /
    an explicit list of samples (a split made by utils.data.splits)."""

    def __init__(self, root: str | Path, transform=None, channels: int = 3, *, scan: FolderScan | None = None,
                 samples: list[tuple[str, int]] | None = None, classes: list[str] | None = None, skip_bad: bool = False,
                 verify: bool = True, resize: int | None = None):
        if scan is None and samples is None:
            scan = scan_folder(root, verify=verify, resize=resize)
            report_bad_images([scan], skip_bad)
        self.root, self.transform, self.channels, self.scan = str(root), transform, channels, scan
        self.classes = list(classes if classes is not None else scan.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = list(samples if samples is not None else scan.samples)
        self.targets = [t for _, t in self.samples]
        self.imgs = self.samples
        self.split: dict | None = None  # the split record when this is the train side of a split folder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = load_image(path, self.channels)
        return (self.transform(img) if self.transform is not None else img), target


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


# ----------------------------------------------------------------------------- entry points


@dataclass
class DataSpec:
    """What dataset to use: Fashion-MNIST under data_root, or an image-folder tree (unreadable images skipped when
    `skip_bad_images`)."""

    dataset: str | None = None
    data_root: str = "data"
    skip_bad_images: bool = False
    val_fraction: float = 0.1  # a folder without val/ is split (utils.data.splits) with this fraction and seed
    seed: int = 42
    split_record: dict | None = None  # a split recorded by an earlier run (--resume, eval.py): used as it is
    resuming: bool = False  # train.py --resume: the folder's split layout must be the one the run started with
    run_dataset: str | None = None  # --resume: the dataset the run trained on (its saved --dataset; None: Fashion-MNIST)
    cache_dir: str | None = None  # the run's --cache_dir: never scanned as a class, even inside the dataset

    @property
    def name(self) -> str:
        return "FashionMNIST" if not self.dataset else Path(self.dataset).resolve().name


def native_image_size(spec: DataSpec, sample: int = 32) -> int | None:
    """The side of the dataset's images when they are all square and of one size (Fashion-MNIST: 28), else None.

    For a folder, the headers of up to `sample` files (a few per class folder, nothing decoded) stand for the rest:
    a folder of 28 px crops says so within its first files, and a mix of photo sizes shows at once."""
    if not spec.dataset:
        return FASHION_MNIST_SIZE
    root = Path(spec.dataset)
    source = split_source(root) or root / "train"
    if not source.is_dir():
        return None
    sizes: set[tuple[int, int]] = set()
    classes = sorted(d for d in source.iterdir() if d.is_dir() and not is_ignored_name(d.name))
    per_class = max(1, sample // max(1, len(classes)))
    for class_dir in classes[:sample]:
        files = sorted(f for f in class_dir.iterdir() if has_image_extension(f.name) and not is_ignored_name(f.name))
        for path in files[:per_class]:
            try:
                with Image.open(path) as img:
                    sizes.add(img.size)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                continue  # the folder check reports it later
            if len(sizes) > 1:
                return None
    (w, h), = sizes if len(sizes) == 1 else ((0, 1),)
    return w if w == h else None


def resolve_crop_pct(crop_pct: float | None, img_size: int, native: int | None) -> float:
    """--crop_pct, or its default: 1.0 when the images already are img_size px (resizing 28 px images to 32 and cropping
    28 back would only blur them and cut their border), the seed's 0.875 (resize 256, crop 224) otherwise."""
    if crop_pct is not None:
        return crop_pct
    return 1.0 if native == img_size else SEED_CROP_PCT


def build_datasets(spec: DataSpec, pre: Preprocess, verify: bool = True, augment: Augment | None = None):
    """Train and validation datasets plus class names. Validation uses the shared eval transform.

    Image folders: both splits are scanned and checked first, their unreadable files reported together (one report),
    and their classes compared."""
    train_tf, val_tf = build_transform(pre, train=True, augment=augment), build_transform(pre, train=False)
    if not spec.dataset:
        return (fashion_mnist(spec.data_root, True, train_tf), fashion_mnist(spec.data_root, False, val_tf),
                list(FASHION_MNIST_CLASSES))
    if not Path(spec.dataset).is_dir():
        raise InputError(f"dataset folder not found: {spec.dataset} (give --dataset a folder of class folders, or one "
                         "holding train/ and val/)")
    source = split_source(spec.dataset)
    check_split_layout(spec, source)
    if source is not None:
        return split_datasets(spec, source, pre, train_tf, val_tf, verify)
    train_dir, val_dir = folder_splits(spec.dataset)
    train_scan = scan_folder(train_dir, verify=verify, resize=pre.resize, cache_dir=spec.cache_dir)
    val_scan = scan_folder(val_dir, verify=verify, resize=pre.resize, cache_dir=spec.cache_dir)
    check_same_classes(train_scan.classes, val_scan.classes, str(train_dir), str(val_dir),
                       "give both splits the same class folders")
    report_bad_images([train_scan, val_scan], spec.skip_bad_images)
    check_disjoint(train_scan, val_scan)
    train_ds = CheckedImageFolder(train_dir, train_tf, pre.channels, scan=train_scan)
    val_ds = CheckedImageFolder(val_dir, val_tf, pre.channels, scan=val_scan)
    return train_ds, val_ds, list(train_ds.classes)


def check_split_layout(spec: DataSpec, source: Path | None) -> None:
    """--resume on a folder whose split layout changed since the run started: a run that split the folder itself
    (its checkpoint records the held-out files) now meeting a val/ (or test/) folder would drop that record and train
    on the held-out files; a run that had val/ now meeting the same folder without one would draw a new split whose
    held-out files it trained on. Either is one line naming the choices."""
    if not spec.resuming:
        return
    if spec.split_record is not None and source is None:
        root = spec.split_record["root"]
        other = f"give --dataset {root}, or " if Path(root).resolve() != Path(spec.dataset).resolve() else ""
        raise InputError(f"--resume: the run split {root} itself (its held-out files are recorded in the checkpoint), but "
                         f"{spec.dataset} now has a val/ (or test/) folder, which would drop that split and train on "
                         f"the held-out files; fix: keep the recorded split ({other}move the new val/ folder out of "
                         f"{spec.dataset}), or start a new run to use it")
    same_folder = spec.run_dataset is not None and Path(spec.run_dataset).resolve() == Path(spec.dataset).resolve()
    if spec.split_record is None and source is not None and same_folder:
        raise InputError(f"--resume: the run validated on the val/ (or test/) folder of {spec.dataset}, which is gone: a "
                         "new split of the folder would hold out images the run trained on; fix: restore the val/ folder, "
                         "or start a new run")


def split_datasets(spec: DataSpec, source: Path, pre: Preprocess, train_tf, val_tf, verify: bool):
    """A folder without val/: split it (stratified, seeded; utils.data.splits), or reuse the split a run recorded.
    The train dataset carries the record as `.split` (saved as split.json and in checkpoints)."""
    if spec.split_record is not None:
        split = from_record(spec.split_record, source)
        classes = list(split.record["classes"])
        scan = check_listed(split.root, classes, split.train + split.val, verify=verify, resize=pre.resize)
        report_bad_images([scan], spec.skip_bad_images)
        usable = set(scan.samples)
        split.train = [s for s in split.train if s in usable]
        split.val = [s for s in split.val if s in usable]
    else:
        scan = scan_folder(source, verify=verify, resize=pre.resize, cache_dir=spec.cache_dir)
        report_bad_images([scan], spec.skip_bad_images)
        classes = scan.classes
        split = stratified_split(source, scan.samples, classes, spec.val_fraction, spec.seed)
    train_ds = CheckedImageFolder(split.root, train_tf, pre.channels, samples=split.train, classes=classes, scan=scan)
    val_ds = CheckedImageFolder(split.root, val_tf, pre.channels, samples=split.val, classes=classes)
    train_ds.split = split.record
    return train_ds, val_ds, classes


def build_eval_dataset(spec: DataSpec, pre: Preprocess, split: str = "val"):
    """The evaluation split: Fashion-MNIST's test set, the held-out files of a recorded split (spec.split_record), or
    the folder's val/ (test/) or named split."""
    tf = build_transform(pre, train=False)
    if not spec.dataset and spec.split_record is None:
        return fashion_mnist(spec.data_root, split == "train", tf), list(FASHION_MNIST_CLASSES), "test" if split != "train" else "train"
    if spec.split_record is not None and split in ("train", "val"):
        recorded = from_record(spec.split_record)
        classes = list(recorded.record["classes"])
        scan = check_listed(recorded.root, classes, recorded.val if split == "val" else recorded.train, resize=pre.resize)
        report_bad_images([scan], spec.skip_bad_images)
        ds = CheckedImageFolder(recorded.root, tf, pre.channels, samples=scan.samples, classes=classes)
        return ds, classes, f"{split} (the run's recorded split)"
    if split_source(spec.dataset) is not None:
        raise InputError(f"{spec.dataset} has no val/ (or test/) folder: train.py splits such a folder and records the "
                         "held-out files in its checkpoints; evaluate that checkpoint (--weights .../best.pth)")
    train_dir, val_dir = folder_splits(spec.dataset)
    folder = {"train": train_dir, "val": val_dir}.get(split, Path(spec.dataset) / split)
    if not folder.is_dir():
        raise InputError(f"split folder not found: {folder}")
    ds = CheckedImageFolder(folder, tf, pre.channels, skip_bad=spec.skip_bad_images, resize=pre.resize)
    return ds, list(ds.classes), folder.name
