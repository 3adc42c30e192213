"""Loaders: the two a training run iterates (train: shuffled, sharded under torchrun; validation: each image once),
the evaluation loader of the split a checkpoint was trained on, and calibration batches for INT8 quantization.

For training, two decisions are made here: whether an image folder is read from the decode-once cache
(utils.data.cache.choose_cache; it then always takes the tensor pipeline), and otherwise the tensor pipeline (dataset
as one uint8 tensor, augmented in batches on the training device) or per-image PIL transforms in DataLoader workers
(utils.data.tensor_pipeline.choose_pipeline). All visit the same images in the same order for a given seed and epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, Subset

from utils.data.augment import Augment
from utils.data.cache import DEFAULT_CACHE_DIR, CacheInfo, cached_split, choose_cache
from utils.data.datasets import DataSpec, build_eval_dataset
from utils.data.preprocess import Preprocess
from utils.data.samplers import SAMPLERS, BalancedSampler, ShardSampler, targets_of
from utils.data.tensor_pipeline import TensorEvalLoader, TensorTrainLoader, build_tensor_loaders, choose_pipeline
from utils.distributed import barrier
from utils.errors import InputError


@dataclass
class TrainLoaders:
    train: object  # DataLoader or TensorTrainLoader
    val: object  # DataLoader or TensorEvalLoader
    sampler: Sampler
    pipeline: str  # "tensor" or "pil"
    reason: str  # why that pipeline, shown at start-up
    seed: int
    caches: list[CacheInfo] = field(default_factory=list)  # the cache files read (empty: no cache)

    def record(self) -> dict:
        """What args.json and the checkpoint keep about the data path: the pipeline and the cache files used."""
        return {"pipeline": self.pipeline, "cache": [asdict(c) for c in self.caches]}

    def set_epoch(self, epoch: int) -> None:
        """Each epoch's order depends only on (seed, epoch), so a resumed run repeats it exactly."""
        if isinstance(self.sampler, (DistributedSampler, BalancedSampler)):
            self.sampler.set_epoch(epoch)
        else:
            self.sampler.generator.manual_seed(self.seed + epoch)


def build_train_loaders(train_set, val_set, pre: Preprocess, augment: Augment, *, pipeline: str, batch_size: int,
                        num_workers: int, device: torch.device, seed: int, rank: int = 0, world: int = 1,
                        sampler: str = "random", cache: str = "off", cache_dir: str | Path = DEFAULT_CACHE_DIR,
                        show_progress: bool = True) -> TrainLoaders:
    """Train and val loaders for datasets built by utils.data.datasets.build_datasets (val batches are twice as large).
    sampler="balanced": every class drawn equally often (BalancedSampler), in both pipelines and per process.
    cache: --cache (auto = image folders through the decode-once cache under cache_dir; off)."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown --sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    if sampler == "balanced":
        targets = targets_of(train_set)
        sampler = BalancedSampler(targets, int(targets.max()) + 1, seed=seed, rank=rank, world_size=world)
        per_rank = len(sampler)
    elif world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        per_rank = len(sampler)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator())
        per_rank = len(train_set)
    drop_last = per_rank > batch_size
    val_sampler = ShardSampler(len(val_set), rank, world)
    use_cache, cache_reason = choose_cache(cache, pipeline, train_set, val_set, pre, cache_dir)
    if use_cache:
        if rank != 0:
            barrier()  # rank 0 builds the cache files first; the others then find them warm
        caches, split_arrays = [], []
        for dataset, kind in ((train_set, "train"), (val_set, "val")):
            images, targets, info = cached_split(dataset, pre, kind, cache_dir, show_progress and rank == 0)
            split_arrays.append((torch.from_numpy(images), torch.from_numpy(targets)))
            caches.append(info)
        if rank == 0 and world > 1:
            barrier()
        (images, targets), (val_images, val_targets) = split_arrays
        train = TensorTrainLoader(images, targets, pre, sampler, batch_size, device, drop_last, augment)
        val = TensorEvalLoader(val_images, val_targets, pre, batch_size * 2, device, val_sampler)
        return TrainLoaders(train, val, sampler, "tensor", cache_reason, seed, caches)
    chosen, reason = choose_pipeline(pipeline, train_set, val_set, pre)
    if cache == "auto" and hasattr(train_set, "samples"):
        reason += f"; no cache: {cache_reason}"
    if chosen == "tensor":
        train, val = build_tensor_loaders(train_set, val_set, pre, sampler, batch_size=batch_size, eval_batch_size=batch_size * 2,
                                          device=device, drop_last=drop_last, val_indices=val_sampler, augment=augment)
    else:
        pin = device.type == "cuda"
        train = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin,
                           drop_last=drop_last, persistent_workers=False)
        val = DataLoader(val_set, batch_size=batch_size * 2, sampler=val_sampler, num_workers=num_workers, pin_memory=pin)
    return TrainLoaders(train, val, sampler, chosen, reason, seed)


def data_spec(train_args: dict | None, dataset: str | None = None, data_root: str | None = None,
              split_record: dict | None = None) -> DataSpec:
    """The dataset a checkpoint was trained on (from its saved args; a folder it split: its recorded split), unless
    --dataset/--data_root override it."""
    args = train_args or {}
    if dataset or data_root:
        return DataSpec(dataset, data_root or args.get("data_root") or "data")
    return DataSpec(args.get("dataset"), args.get("data_root") or "data", split_record=split_record)


def calibration_batches(spec: DataSpec, pre: Preprocess, num_batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """`num_batches` batches of training images through the eval transform, from a seeded random sample
    (image folders are sorted by class, so the first images would all be one class)."""
    ds, _, _ = build_eval_dataset(spec, pre, "train")
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch_size, sampler=RandomSampler(ds, generator=gen))
    out = []
    for images, _ in loader:
        out.append(images)
        if len(out) == num_batches:
            break
    return out


def eval_loader(spec: DataSpec, pre: Preprocess, batch_size: int, max_images: int | None = None,
                num_workers: int = 0) -> tuple[DataLoader, list[str]]:
    """The validation split (eval transform), optionally only its first `max_images` images."""
    ds, classes, _ = build_eval_dataset(spec, pre, "val")
    if max_images and max_images < len(ds):
        ds = Subset(ds, range(max_images))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers), classes
