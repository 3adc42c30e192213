"""The fast data pipeline: the dataset held as one uint8 tensor, augmented in batches on the training device
(`utils.data.batch_augment`); whether it fits (`choose_pipeline`), the tensors themselves and their loaders.

Why: the PIL pipeline decodes, upsamples, rotates and normalises every image separately in DataLoader
workers; on a CPU that costs more than the small network's training step. Here a batch of B images
is augmented with ONE grid_sample call.

Validation equals the shared eval transform bit for bit: the val set is resized and centre-cropped once
with the same PIL code (`utils.data.preprocess`), kept as uint8, and normalised per batch with the same float32
operations.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

from utils.data.augment import Augment, resolve_augment
from utils.data.batch_augment import augment_batch, normalize_batch, sample_params
from utils.data.preprocess import Preprocess, center_crop, load_image, resize_shorter, to_model_mode
from utils.errors import InputError
from utils.progress import bar

PIPELINES = ("auto", "pil", "tensor")
MEMORY_FRACTION = 0.25  # auto uses the tensor pipeline when its tensors need at most this share of free RAM


# ----------------------------------------------------------------------------- datasets as tensors


def _dataset_kind(dataset) -> str:
    data = getattr(dataset, "data", None)
    if isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.ndim in (3, 4):
        return "tensor"  # torchvision's MNIST family: the whole split is already one uint8 tensor
    if hasattr(dataset, "samples") and hasattr(dataset, "targets"):
        return "folder"
    return "other"


def _folder_channels(dataset, pre: Preprocess) -> int:
    return getattr(dataset, "channels", pre.channels)


def train_tensor_bytes(dataset, pre: Preprocess) -> int | None:
    """Bytes of the uint8 train tensor, or None when the images differ in size (no single tensor)."""
    kind = _dataset_kind(dataset)
    if kind == "tensor":
        return dataset.data.numel()
    if kind != "folder":
        return None
    sizes = set()
    for path, _ in dataset.samples:
        with Image.open(path) as img:
            sizes.add(img.size)
        if len(sizes) > 1:
            return None
    (w, h), = sizes
    return len(dataset.samples) * _folder_channels(dataset, pre) * w * h


def eval_tensor_bytes(dataset, pre: Preprocess) -> int:
    channels = 1 if _dataset_kind(dataset) == "tensor" else _folder_channels(dataset, pre)
    return len(dataset) * channels * pre.img_size * pre.img_size


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable from /proc/meminfo (total physical memory elsewhere),
    lowered to what is left under a container's cgroup memory limit (inside a container /proc/meminfo describes the
    host, and the OOM killer acts on the limit) and under the address-space limit (ulimit -v) when those are smaller."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(free, _cgroup_headroom(), _address_space_headroom())


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # absent, or "max" (no limit)
        return None


def _cgroup_headroom() -> int:
    """Limit minus usage of this container's memory cgroup (v2, else v1), the reclaimable page cache counted free."""
    for folder, limit_file, usage_file, cache_key in (("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
                                                      ("/sys/fs/cgroup/memory", "memory.limit_in_bytes",
                                                       "memory.usage_in_bytes", "total_inactive_file")):
        limit, usage = _read_int(f"{folder}/{limit_file}"), _read_int(f"{folder}/{usage_file}")
        if limit is None or usage is None or limit >= 2**60:  # v1 writes "no limit" as a huge number
            continue
        try:
            with open(f"{folder}/memory.stat") as f:
                cache = next((int(line.split()[1]) for line in f if line.split()[0] == cache_key), 0)
        except OSError:
            cache = 0
        return max(0, limit - usage + cache)
    return 2**63


def _address_space_headroom() -> int:
    """RLIMIT_AS (ulimit -v) minus this process's virtual size: past it every allocation fails."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return 2**63
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        return max(0, limit - size)
    except (ImportError, OSError, StopIteration):  # Windows, or no /proc
        return 2**63


def choose_pipeline(choice: str, train_set, val_set, pre: Preprocess) -> tuple[str, str]:
    """Resolve --data_pipeline: returns ("tensor" | "pil", reason shown to the user).

    auto = tensor when the train images share one size and the train + val tensors fit in a quarter of the
    free memory (Fashion-MNIST always does); otherwise pil.
    """
    if choice not in PIPELINES:
        raise InputError(f"unknown --data_pipeline {choice!r}: choose from {', '.join(PIPELINES)}")
    if choice == "pil":
        return "pil", "--data_pipeline pil"
    train_bytes = train_tensor_bytes(train_set, pre)
    if train_bytes is None:
        reason = "the train images differ in size (the tensor pipeline stores them as one tensor)"
        if choice == "tensor":
            raise InputError(f"--data_pipeline tensor: {reason}; use the decode-once cache (--cache auto), resize them to "
                             "one size, or use --data_pipeline pil")
        return "pil", reason
    needed = train_bytes + eval_tensor_bytes(val_set, pre)
    budget = int(available_memory() * MEMORY_FRACTION)
    if choice == "auto" and needed > budget:
        return "pil", f"the dataset as uint8 tensors needs {needed / 2**20:.0f} MiB, over the {budget / 2**20:.0f} MiB budget"
    return "tensor", f"dataset held as uint8 tensors ({needed / 2**20:.0f} MiB), augmented in batches"


def _load_folder(dataset, channels: int, transform=None, desc: str = "loading images") -> np.ndarray:
    arrays = []
    for path, _ in bar(dataset.samples, desc=desc, leave=False, enabled=len(dataset.samples) >= 2000):
        img = load_image(path, channels)
        arrays.append(np.asarray(transform(img) if transform else img, dtype=np.uint8))
    stacked = np.stack(arrays)
    return stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)


def train_images_tensor(dataset, pre: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """The train split as (uint8 (N, C, H, W), int64 targets). Grayscale Fashion-MNIST keeps C = 1."""
    kind = _dataset_kind(dataset)
    if kind == "tensor":
        data = dataset.data
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64)
    if kind == "folder":
        images = _load_folder(dataset, _folder_channels(dataset, pre), desc="loading train images")
        return torch.from_numpy(images), torch.as_tensor(dataset.targets, dtype=torch.int64)
    raise InputError(f"--data_pipeline tensor does not support {type(dataset).__name__}: use --data_pipeline pil")


def eval_images_tensor(dataset, pre: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval split resized and centre-cropped by the shared PIL code, as (uint8 (N, C, S, S), targets)."""

    def resize_and_crop(img: Image.Image) -> Image.Image:
        return center_crop(resize_shorter(img, pre.resize, pre.interpolation), pre.img_size)

    kind = _dataset_kind(dataset)
    if kind == "tensor":
        data = dataset.data.numpy()
        if data.ndim == 3:  # grayscale: resizing L equals resizing its RGB copy channel by channel
            crops = np.stack([np.asarray(resize_and_crop(Image.fromarray(a, "L"))) for a in data])[:, None]
        else:
            crops = np.stack([np.asarray(resize_and_crop(to_model_mode(Image.fromarray(a), pre.channels)))
                              for a in data])
            crops = crops[:, None] if crops.ndim == 3 else crops.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(crops)), torch.as_tensor(dataset.targets, dtype=torch.int64)
    if kind == "folder":
        crops = _load_folder(dataset, _folder_channels(dataset, pre), resize_and_crop, desc="preparing val images")
        return torch.from_numpy(np.ascontiguousarray(crops)), torch.as_tensor(dataset.targets, dtype=torch.int64)
    raise InputError(f"--data_pipeline tensor does not support {type(dataset).__name__}: use --data_pipeline pil")


# ----------------------------------------------------------------------------- loaders


class TensorTrainLoader:
    """Batches of augmented images from a uint8 tensor; any index sampler (RandomSampler, DistributedSampler).

    Behaves like a DataLoader for train_one_epoch: len() is the number of batches, iteration yields
    (float32 images, int64 targets) on `device`. The sampler decides order and sharding, exactly as
    with the PIL pipeline, so both pipelines visit the same images in the same order.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, pre: Preprocess, sampler: Sampler | list,
                 batch_size: int, device: torch.device | str = "cpu", drop_last: bool = True, augment: Augment | None = None):
        if batch_size <= 0:
            raise InputError(f"--batch_size must be > 0, got {batch_size}")
        self.images, self.targets, self.pre, self.sampler = images, targets, pre, sampler
        self.augment = augment or resolve_augment("auto", pre.img_size)
        self.batch_size, self.device, self.drop_last = batch_size, torch.device(device), drop_last
        if self.device.type == "cuda" and self.images.numel() < MEMORY_FRACTION * 2 * torch.cuda.mem_get_info(self.device)[0]:
            self.images = self.images.to(self.device)  # uint8 on the GPU: indexing there avoids host copies
            self.targets = self.targets.to(self.device)
        # otherwise (CPU, or a cache larger than half the free GPU memory) each batch is gathered on the host, from
        # memory or from the memory-mapped cache file, and only the batch moves to the device

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else (n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        """The batches from batch `start` on, in the epoch's order (a stopped epoch resumes here without touching the
        batches before it; their random draws are restored by the caller)."""
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        height, width = self.images.shape[-2:]
        for b in range(start, len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            params = sample_params(len(index), height, width, augment=self.augment, out_size=self.pre.img_size)
            index = index.to(self.images.device)
            with torch.no_grad():
                images = augment_batch(self.images[index].to(self.device, non_blocking=True), params, self.pre, self.augment)
            yield images, self.targets[index].to(self.device, non_blocking=True)


class TensorEvalLoader:
    """Batches of eval-transformed images (bit-equal to utils.data.preprocess.eval_transform) from a uint8 tensor."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, pre: Preprocess, batch_size: int,
                 device: torch.device | str = "cpu", indices: list[int] | Sampler | None = None):
        self.images, self.targets, self.pre, self.batch_size = images, targets, pre, batch_size
        self.device = torch.device(device)
        self.indices = torch.as_tensor(list(indices) if indices is not None else range(len(images)), dtype=torch.int64)

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for b in range(len(self)):
            index = self.indices[b * self.batch_size:(b + 1) * self.batch_size]
            images = normalize_batch(self.images[index].to(self.device, non_blocking=True), self.pre)
            yield images, self.targets[index].to(self.device, non_blocking=True)


def build_tensor_loaders(train_set, val_set, pre: Preprocess, sampler: Sampler, *, batch_size: int, eval_batch_size: int,
                         device: torch.device, drop_last: bool, val_indices=None,
                         augment: Augment | None = None) -> tuple[TensorTrainLoader, TensorEvalLoader]:
    """Train and val loaders of the tensor pipeline for datasets built by utils.data.datasets.build_datasets."""
    images, targets = train_images_tensor(train_set, pre)
    train_loader = TensorTrainLoader(images, targets, pre, sampler, batch_size, device, drop_last, augment)
    val_images, val_targets = eval_images_tensor(val_set, pre)
    val_loader = TensorEvalLoader(val_images, val_targets, pre, eval_batch_size, device, val_indices)
    return train_loader, val_loader
