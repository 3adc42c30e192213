"""Decode-once image cache: each photo decoded and resized once, kept as uint8 in a memory-mapped .npy file.

Why: with per-image PIL transforms, every epoch decodes every JPEG and resizes it from full resolution; on a few CPU
cores that costs more than the network for small and medium models. The cache does that work once; later epochs and
later runs read the uint8 pixels from the page cache and the tensor pipeline (utils.data.tensor_pipeline) augments
them in batches, on the GPU when training there.

What is stored (the choice): for training, each image's shorter side resized to `pre.resize` (img_size x 256/224,
the eval resize) and its central `resize` x `resize` square. That square holds everything eval looks at (the
centred img_size crop) plus the margin the random crops move in; a photo's far left and right edges (for 4:3 photos,
an eighth of the width each side) are given up so that every image fits one array. Random resized crops are then
drawn from the square at its stored resolution, so a crop is upsampled from `resize` pixels instead of being cut
from the full-resolution photo: slightly softer, statistically the same augmentation (tested). For validation, the
exact eval-transform crop (resize, centre crop img_size) is stored, bit-identical to utils.data.preprocess.

Keyed by the file list, each file's size and modification time, the stored geometry and the format version, so any
added, removed, replaced or touched file builds a new cache; an unchanged folder reuses it across runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.data.preprocess import Preprocess, center_crop, load_image, resize_shorter
from utils.errors import InputError
from utils.io import atomic_path, atomic_write_text

CACHE_VERSION = 1
CACHE_MODES = ("auto", "off")
DEFAULT_CACHE_DIR = Path("data") / ".cache"


@dataclass(frozen=True)
class CacheLayout:
    """What one cache file holds: `count` images of `channels` x `side` x `side` uint8 pixels, made by `kind`
    ("train": shorter side to `resize`, central square; "eval": the eval transform's crop)."""

    kind: str
    side: int
    resize: int
    channels: int
    interpolation: str

    @classmethod
    def for_split(cls, kind: str, pre: Preprocess) -> CacheLayout:
        side = pre.resize if kind == "train" else pre.img_size
        return cls(kind, side, pre.resize, pre.channels, pre.interpolation)


def cache_key(paths: Sequence[str | Path], layout: CacheLayout) -> str:
    """sha256 of the format version, the layout, and every file's path, size and modification time (ns), in order."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **asdict(layout)}, sort_keys=True).encode())
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def decode(path: str | Path, layout: CacheLayout) -> np.ndarray:
    """One image as the cache stores it: uint8 (channels, side, side)."""
    img = resize_shorter(load_image(path, layout.channels), layout.resize, layout.interpolation)
    arr = np.asarray(center_crop(img, layout.side), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def open_cache(paths: Sequence[str | Path], layout: CacheLayout, cache_dir: str | Path = DEFAULT_CACHE_DIR,
               show_progress: bool = True, workers: int | None = None) -> tuple[np.ndarray, bool]:
    """The cached images of `paths` (uint8 (N, C, side, side), memory-mapped, copy-on-write), building the cache file
    first when there is none for exactly these files. Returns (images, built_now)."""
    cache_dir = Path(cache_dir)
    key = cache_key(paths, layout)
    path = cache_dir / f"{layout.kind}-{layout.side}px-{key}.npy"
    shape = (len(paths), layout.channels, layout.side, layout.side)
    if path.is_file():
        images = np.load(path, mmap_mode="c")
        if images.shape == shape and images.dtype == np.uint8:
            return images, False
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            # Pillow releases the GIL while it decodes and resizes, so threads use every core
            with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
                done = pool.map(lambda p: decode(p, layout), paths)
                for i, arr in enumerate(tqdm(done, total=len(paths), desc=f"caching {layout.kind} images ({layout.side} px)",
                                             disable=not show_progress, dynamic_ncols=True, leave=False)):
                    out[i] = arr
            out.flush()
            del out
        atomic_write_text(path.with_suffix(".json"), json.dumps({"files": len(paths), **asdict(layout),
                                                                 "version": CACHE_VERSION}, indent=2) + "\n")
    except OSError as e:
        raise InputError(f"cannot write the image cache in {cache_dir}: {e.strerror or e} (free some space, choose another "
                         "folder with --cache_dir, or train without it: --cache off)") from None
    return np.load(path, mmap_mode="c"), True
