"""The benchmarks' folder of photos: photo-sized JPEGs (500x375 px, quality 90) in 10 classes of visibly different
content, all derived from the real pictures matplotlib ships as sample data (a photograph, a terrain elevation model,
a bathymetry grid, an MRI slice): crops at random positions and scales, flips, colour shifts and noise of them. Written
once under a root as train/<class>/ and val/<class>/ (the layout of torchvision's ImageFolder and of Ultralytics'
classification datasets) and reused while its parameters match. No photo collection can be downloaded here, so
bench_photos.py and bench_vs_ultralytics.py make this one."""

from __future__ import annotations

import gzip
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.io import atomic_path
from utils.io import write_json as write_json_file

PHOTO_SIZE = (500, 375)
JPEG_QUALITY = 90
DATA_VERSION = 1
CLASSES = ("portrait", "portrait_recoloured", "portrait_sepia", "terrain", "hillshade", "bathymetry", "mri_bone", "mri_inferno",
           "portrait_terrain_blend", "landscape_scene")

def colormap(values: np.ndarray, name: str) -> np.ndarray:
    """float array -> RGB uint8 through a matplotlib colormap (values scaled to 0-1 by their own range)."""
    from matplotlib import colormaps

    lo, hi = np.percentile(values, 1), np.percentile(values, 99)
    return (colormaps[name](np.clip((values - lo) / (hi - lo + 1e-9), 0, 1))[..., :3] * 255).astype(np.uint8)


def upsample(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))


def source_pictures() -> tuple[dict[str, np.ndarray], list[str]]:
    """One RGB canvas per class, all from matplotlib's sample data; and the names of the files used."""
    from matplotlib import cbook

    used = ["grace_hopper.jpg", "jacksboro_fault_dem.npz", "topobathy.npz", "s1045.ima.gz"]
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        hopper = np.asarray(img.convert("RGB"))  # 600 x 512 photograph
    dem = np.asarray(np.load(cbook.get_sample_data("jacksboro_fault_dem.npz", asfileobj=False))["elevation"], np.float32)
    topo = np.asarray(np.load(cbook.get_sample_data("topobathy.npz", asfileobj=False))["topo"], np.float32)
    with gzip.open(cbook.get_sample_data("s1045.ima.gz", asfileobj=False)) as f:
        mri = np.frombuffer(f.read(), np.uint16).reshape(256, 256).astype(np.float32)
    size = (hopper.shape[1], hopper.shape[0])
    gray = hopper.mean(2, keepdims=True)
    sepia = np.clip(gray * np.array([1.07, 0.9, 0.66]), 0, 255).astype(np.uint8)
    gy, gx = np.gradient(dem)
    shade = np.clip(128 + 3.0 * (gx - gy), 0, 255).astype(np.uint8)
    terrain = upsample(colormap(dem, "terrain"), size)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:450, 0:600]
    sky = np.stack([80 + 0.25 * yy, 130 + 0.2 * yy, 230 - 0.05 * yy], -1)
    ridge = 230 + 60 * np.interp(xx[0], np.linspace(0, 599, dem.shape[1]), (dem[170] - dem[170].mean()) / dem[170].std())
    scene = np.where((yy > ridge)[..., None], np.array([70, 110, 60]) + rng.normal(0, 12, (450, 600, 3)), sky)
    scene = np.where((((xx - 460) ** 2 + (yy - 90) ** 2) < 40 ** 2)[..., None], np.array([255, 230, 150]), scene)
    canvases = {
        "portrait": hopper, "portrait_recoloured": hopper[..., [2, 0, 1]], "portrait_sepia": sepia,
        "terrain": terrain, "hillshade": upsample(np.repeat(shade[..., None], 3, 2), size),
        "bathymetry": upsample(colormap(topo, "ocean"), (600, 450)),
        "mri_bone": upsample(colormap(mri, "bone"), (512, 512)), "mri_inferno": upsample(colormap(mri, "inferno"), (512, 512)),
        "portrait_terrain_blend": ((hopper.astype(np.float32) + terrain) / 2).astype(np.uint8),
        "landscape_scene": np.clip(scene, 0, 255).astype(np.uint8),
    }
    return canvases, used


def render_photo(canvas: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A 500x375 'photo' of a canvas: a random 4:3 crop (20-100% of the canvas width), flip, colour shift, noise."""
    h, w = canvas.shape[:2]
    cw = int(w * rng.uniform(0.45, 1.0))
    ch = min(h, int(cw * 3 / 4))
    cw = int(ch * 4 / 3)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    img = Image.fromarray(canvas).crop((x, y, x + cw, y + ch)).resize(PHOTO_SIZE, Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, np.float32) * rng.uniform(0.85, 1.15, 3) + rng.uniform(-15, 15)
    arr += rng.normal(0, 4, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_photo_folder(root: Path, images: int, val_fraction: float, seed: int = 0, show_progress: bool = True) -> dict:
    """Write root/train/<class>/*.jpg and root/val/<class>/*.jpg (reused when root/folder.json matches)."""
    spec = {"version": DATA_VERSION, "images": images, "val_fraction": val_fraction, "seed": seed,
            "size": list(PHOTO_SIZE), "quality": JPEG_QUALITY, "classes": list(CLASSES)}
    marker = root / "folder.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        return json.loads(marker.read_text())
    if root.exists():
        shutil.rmtree(root)
    canvases, used = source_pictures()
    per_class = [images // len(CLASSES) + (k < images % len(CLASSES)) for k in range(len(CLASSES))]
    jobs = []
    for k, name in enumerate(CLASSES):
        n_val = max(1, round(per_class[k] * val_fraction))
        for i in range(per_class[k]):
            split = "val" if i < n_val else "train"
            jobs.append((name, root / split / name / f"{name}_{i:05d}.jpg", (seed, k, i)))
    for split in ("train", "val"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)

    def write(job) -> None:
        name, path, key = job
        with atomic_path(path) as tmp:
            render_photo(canvases[name], np.random.default_rng(key)).save(tmp, "JPEG", quality=JPEG_QUALITY)

    with ThreadPoolExecutor() as pool:
        list(tqdm(pool.map(write, jobs), total=len(jobs), desc="writing photos", disable=not show_progress, leave=False))
    info = {"spec": spec, "sources": [f"matplotlib sample data: {name}" for name in used]}
    write_json_file(marker, info)
    return info
