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
from the full-resolution photo: slightly softer; on square photos statistically the same augmentation (tested),
on 4:3 photos the crops cover the central square instead of the whole (squashed) width, i.e. the geometry eval sees.
For validation, the exact eval-transform crop (resize, centre crop img_size) is stored, bit-identical to
utils.data.preprocess.

Keyed by the file list, each file's size, modification time, status-change time (st_ctime_ns: it changes on every
write, even when an editor or `touch -r` restores the modification time) and inode, the stored geometry, the Pillow
version (its resampling defines the pixels) and the format version, so any added, removed, replaced, edited in place
or touched file builds a new cache; an unchanged folder reuses it across runs. The pixels themselves are checked too:
the build stores a CRC-32 of each cached image in the cache's .json, and every open verifies them (one read of the
file, in threads; it also warms the page cache the first epoch reads), so pixels overwritten in the cache file are
noticed and just those images are decoded again from their files. Files are written under a temporary name and
renamed into place only when complete (utils.io.atomic_path), so a killed build never leaves a file that a later run
trusts; the temporary files of killed builds (hundreds of MB) are removed when the next run opens the cache folder
(utils.io.remove_stale_temps). A cache folder is never scanned as data (utils.data.formats.is_cache_dir), so
--cache_dir may lie inside the dataset; it must not hold the images themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from utils.data.preprocess import Preprocess, center_crop, load_image, resize_shorter
from utils.data.tensor_pipeline import train_tensor_bytes
from utils.errors import InputError
from utils.io import atomic_path, atomic_write_text, display_path, remove_stale_temps
from utils.progress import bar as progress_bar

CACHE_VERSION = 3
CACHE_MODES = ("auto", "off")
DEFAULT_CACHE_DIR = Path("data") / ".cache"
DISK_FRACTION = 0.5  # auto uses the cache when its files need at most this share of the free disk


@dataclass(frozen=True)
class CacheLayout:
    """What one cache file holds: `count` images of `channels` x `side` x `side` uint8 pixels, made by `kind`
    ("train": shorter side to `resize`, central square; "val": the eval transform's crop)."""

    kind: str
    side: int
    resize: int
    channels: int
    interpolation: str

    @classmethod
    def for_split(cls, kind: str, pre: Preprocess, channels: int | None = None) -> CacheLayout:
        side = pre.resize if kind == "train" else pre.img_size
        return cls(kind, side, pre.resize, channels or pre.channels, pre.interpolation)

    def nbytes(self, count: int) -> int:
        return count * self.channels * self.side * self.side


@dataclass
class CacheInfo:
    """One cache file as a run used it (printed at start-up, saved in args.json and the checkpoint's args)."""

    kind: str
    path: str
    built: bool
    seconds: float  # build time (0 when warm)
    images: int
    nbytes: int
    repaired: int = 0  # images whose cached pixels failed their checksum and were decoded again

    def describe(self) -> str:
        state = f"built in {self.seconds:.1f} s" if self.built else "warm"
        if self.repaired:
            state += f", {self.repaired} damaged image{'s' if self.repaired > 1 else ''} decoded again"
        return f"data: cache {self.path} ({state}; {self.images} {self.kind} images, {self.nbytes / 2**20:.1f} MiB)"


def cache_key(paths: Sequence[str | Path], layout: CacheLayout) -> str:
    """sha256 of the format version, Pillow's version, the layout, and every file's absolute path, size, modification
    time, status-change time (ns) and inode, in order."""
    header = {"version": CACHE_VERSION, "pillow": PIL.__version__, **asdict(layout)}
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            raise InputError(f"cannot read image {path}: {e.strerror or e} (remove it from the folder or restore it)") from None
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n"
                 .encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def folder_tag(paths: Sequence[str | Path]) -> str:
    """A short hash of the images' common folder: names the cache files of one dataset split, so a rebuild can
    remove that split's outdated files and nothing else."""
    if not paths:
        return "empty"
    common = os.path.commonpath([os.path.abspath(p) for p in paths]) if len(paths) > 1 else os.path.dirname(os.path.abspath(paths[0]))
    return hashlib.sha256(common.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def cache_path(paths: Sequence[str | Path], layout: CacheLayout, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    gray = "-gray" if layout.channels == 1 else ""  # its own prefix: RGB and grayscale runs never remove each other's file
    return Path(cache_dir) / f"{layout.kind}-{layout.side}px{gray}-{folder_tag(paths)}-{cache_key(paths, layout)}.npy"


def decode(path: str | Path, layout: CacheLayout) -> np.ndarray:
    """One image as the cache stores it: uint8 (channels, side, side), made by utils.data.preprocess's own
    functions (so the val layout is exactly the eval transform's crop)."""
    img = resize_shorter(load_image(path, layout.channels, layout.resize), layout.resize, layout.interpolation)
    arr = np.asarray(center_crop(img, layout.side), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _open_existing(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cache file memory-mapped (copy-on-write: the pipeline never changes it on disk), or None when there is
    none or it is not a complete array of the expected shape (a damaged file is rebuilt, never trusted)."""
    if not path.is_file():
        return None
    try:
        images = np.load(path, mmap_mode="c")
    except (ValueError, OSError, EOFError):
        return None
    if images.shape != shape or images.dtype != np.uint8:
        return None
    return images


def remove_leftovers(cache_dir: Path, prefix: str, keep: Path) -> None:
    """Delete this split's outdated cache files (same kind, size and folder, another key)."""
    for entry in cache_dir.iterdir():
        if entry.name.startswith(prefix) and entry != keep and entry.with_suffix(".npy") != keep:
            entry.unlink(missing_ok=True)


def checksums(images: np.ndarray, workers: int) -> list[int]:
    """CRC-32 of each image's bytes, in threads (zlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda i: zlib.crc32(np.ascontiguousarray(images[i])), range(len(images))))


def _build(path: Path, paths: Sequence[str | Path], layout: CacheLayout, show_progress: bool, workers: int) -> list[int]:
    """Decode every image into a new cache file; returns each image's CRC-32."""
    shape = (len(paths), layout.channels, layout.side, layout.side)
    crcs = []
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        with open(tmp, "r+b") as f:  # reserve the blocks now: a full disk is an OSError here, not a SIGBUS later
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
        # Pillow releases the GIL while it decodes and resizes, so threads share the work across cores;
        # chunks keep at most a few hundred decoded images waiting in memory
        chunk = 64 * workers
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                progress_bar(total=len(paths), desc=f"caching {layout.kind} images", unit="img", enabled=show_progress,
                             leave=False) as shown:
            for start in range(0, len(paths), chunk):
                for i, arr in enumerate(pool.map(lambda p: decode(p, layout), paths[start:start + chunk]), start):
                    out[i] = arr
                    crcs.append(zlib.crc32(np.ascontiguousarray(arr)))
                    shown.update()
        out.flush()
        del out
    return crcs


def _describe(path: Path, paths: Sequence[str | Path], layout: CacheLayout, crcs: list[int]) -> None:
    """The cache's .json: what it holds, and the CRC-32 of each image that every open verifies."""
    atomic_write_text(path.with_suffix(".json"), json.dumps(
        {"files": len(paths), "first": str(paths[0]) if paths else None, **asdict(layout), "version": CACHE_VERSION,
         "pillow": PIL.__version__, "built": time.strftime("%Y-%m-%d %H:%M:%S"), "crc32": crcs}, indent=2) + "\n")


def _stored_checksums(path: Path, count: int) -> list[int] | None:
    try:
        crcs = json.loads(path.with_suffix(".json").read_text()).get("crc32")
    except (OSError, ValueError, AttributeError):
        return None
    return crcs if isinstance(crcs, list) and len(crcs) == count else None


def _repair(path: Path, paths: Sequence[str | Path], layout: CacheLayout, damaged: list[int], workers: int) -> None:
    """Decode the `damaged` images again from their files into the cache file, in place."""
    out = np.load(path, mmap_mode="r+")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, arr in zip(damaged, pool.map(lambda i: decode(paths[i], layout), damaged)):
            out[i] = arr
    out.flush()
    del out


def check_cache_dir(cache_dir: Path, paths: Sequence[str | Path]) -> None:
    """--cache_dir may lie inside the dataset (scans skip it) but must not hold its images: it would become part of
    a class folder."""
    folder = os.path.realpath(cache_dir)
    inside = next((p for p in paths if os.path.realpath(p).startswith(folder + os.sep)), None)
    if inside is not None:
        raise InputError(f"--cache_dir {display_path(cache_dir)} holds the dataset's image {display_path(inside)}: choose a "
                         "folder outside the class folders (e.g. <dataset>/.cache or the default data/.cache)")


def open_cache(paths: Sequence[str | Path], layout: CacheLayout, cache_dir: str | Path = DEFAULT_CACHE_DIR,
               show_progress: bool = True, workers: int | None = None) -> tuple[np.ndarray, CacheInfo]:
    """The cached images of `paths` (uint8 (N, C, side, side), memory-mapped, copy-on-write), building the cache file
    first when there is none for exactly these files (same list, sizes, times, inodes and geometry). A warm cache's
    pixels are verified against their checksums; damaged images are decoded again (CacheInfo.repaired)."""
    cache_dir = Path(cache_dir)
    check_cache_dir(cache_dir, paths)
    workers = workers or os.cpu_count() or 1
    remove_stale_temps(cache_dir)  # a killed build's temporary file: removed before anything else needs the disk
    path = cache_path(paths, layout, cache_dir)
    shape = (len(paths), layout.channels, layout.side, layout.side)
    images = _open_existing(path, shape)
    crcs = _stored_checksums(path, len(paths)) if images is not None else None
    if images is not None and crcs is not None:
        damaged = [i for i, (got, want) in enumerate(zip(checksums(images, workers), crcs)) if got != want]
        if damaged:
            del images
            try:
                _repair(path, paths, layout, damaged, workers)
            except OSError as e:
                raise InputError(f"cannot repair the image cache {display_path(path)}: {e.strerror or e} (delete it, or "
                                 "train without it: --cache off)") from None
            images = _open_existing(path, shape)
        return images, CacheInfo(layout.kind, str(path), False, 0.0, len(paths), layout.nbytes(len(paths)), len(damaged))
    start = time.perf_counter()
    del images
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        crcs = _build(path, paths, layout, show_progress, workers)
        _describe(path, paths, layout, crcs)
        remove_leftovers(cache_dir, path.name.rsplit("-", 1)[0] + "-", path)
    except OSError as e:
        raise InputError(f"cannot write the image cache in {cache_dir}: {e.strerror or e} (free some space, choose another "
                         "folder with --cache_dir, or train without it: --cache off)") from None
    images = _open_existing(path, shape)
    if images is None:
        raise InputError(f"the image cache {path} was changed while it was built (another process?); run again")
    return images, CacheInfo(layout.kind, str(path), True, time.perf_counter() - start, len(paths), layout.nbytes(len(paths)))


def free_disk(folder: Path) -> int:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def choose_cache(choice: str, pipeline: str, train_set, val_set, pre: Preprocess,
                 cache_dir: str | Path = DEFAULT_CACHE_DIR) -> tuple[bool, str]:
    """Resolve --cache: (use it, why). auto = use it for image folders, on GPUs and CPUs alike, unless the images
    already share one size no larger than the cached one (the tensor pipeline then holds them exactly as they are,
    in memory) or the cache files would need more than half the free disk. benchmarks/bench_photos.py measured the
    warm cache at least as fast as PIL workers on 2 CPU cores for every model and size it tried (4.2x for FashionCNN
    at 64 px, 1.1x at 224 px where the network itself sets the pace; README table)."""
    if choice not in CACHE_MODES:
        raise InputError(f"unknown --cache {choice!r}: choose from {', '.join(CACHE_MODES)}")
    if choice == "off":
        return False, "--cache off"
    if pipeline == "pil":
        return False, "--data_pipeline pil"
    if not (hasattr(train_set, "samples") and hasattr(val_set, "samples")):
        return False, "the dataset is already held as one uint8 tensor"
    channels = getattr(train_set, "channels", pre.channels)
    layout = CacheLayout.for_split("train", pre, channels)
    native = None
    if train_set.samples:
        try:
            with Image.open(train_set.samples[0][0]) as img:
                small = img.size[0] * img.size[1] <= layout.side * layout.side
        except (OSError, ValueError):
            small = False  # unreadable: the build names the file
        # only folders whose first image is small can be uniform and no larger: read all headers only then
        native = train_tensor_bytes(train_set, pre) if small else None
    if native is not None and native <= layout.nbytes(len(train_set.samples)):
        return False, "the images share one size no larger than the cache's: held in memory as they are"
    needed = layout.nbytes(len(train_set.samples)) + CacheLayout.for_split("val", pre, channels).nbytes(len(val_set.samples))
    free = free_disk(Path(cache_dir))
    if needed > DISK_FRACTION * free:
        return False, (f"the cache would need {needed / 2**30:.1f} GiB, over half the free disk under {cache_dir} "
                       f"({free / 2**30:.1f} GiB); choose another --cache_dir")
    return True, f"images decoded once into {cache_dir} ({needed / 2**20:.1f} MiB), augmented in batches"


def cached_split(dataset, pre: Preprocess, kind: str, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                 show_progress: bool = True) -> tuple[np.ndarray, np.ndarray, CacheInfo]:
    """A folder dataset's images from the cache (built when missing) and its int64 targets, in `samples` order."""
    paths = [path for path, _ in dataset.samples]
    layout = CacheLayout.for_split(kind, pre, getattr(dataset, "channels", pre.channels))
    images, info = open_cache(paths, layout, cache_dir, show_progress)
    targets = np.asarray([target for _, target in dataset.samples], dtype=np.int64)
    return images, targets, info
