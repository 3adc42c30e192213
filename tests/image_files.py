"""Real image files for the image-folder tests, written by Pillow: every format and mode the scanner must take,
and the broken ones it must refuse."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB picture with structure (a gradient, a bright square, noise), so each format compresses it realistically."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), np.full_like(xx, 90)], -1)
    arr[height // 4:height // 2, width // 4:width // 2] = 240
    arr = arr + rng.integers(-10, 11, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


# name -> how to write it: every format/mode combination the scanner must read (torchvision's ImageFolder skips
# .gif, .jpe and .jfif)
def _i16(img: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)  # mode I;16


GOOD_FILES = {
    "rgb.jpg": lambda img: img,
    "gray.jpeg": lambda img: img.convert("L"),
    "cmyk.jpg": lambda img: img.convert("CMYK"),
    "rgba.png": lambda img: img.convert("RGBA"),
    "palette.png": lambda img: img.convert("P"),
    "sixteen_bit.png": _i16,
    "anim.gif": lambda img: img.convert("P"),
    "scan.tif": lambda img: img,
    "scan2.tiff": lambda img: img.convert("L"),
    "photo.webp": lambda img: img,
    "old.bmp": lambda img: img,
    "camera.jpe": lambda img: img,
    "camera.jfif": lambda img: img,
}
FORMAT_OF = {".jpe": "JPEG", ".jfif": "JPEG"}


def write_good_files(folder: Path, seed: int = 0) -> list[Path]:
    """One file per GOOD_FILES entry, of mixed sizes, in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, convert) in enumerate(GOOD_FILES.items()):
        path = folder / name
        img = convert(picture(23 + 7 * i, 31 + 5 * (i % 4), seed + i))
        img.save(path, FORMAT_OF.get(path.suffix))
        paths.append(path)
    return paths


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    picture(width, height, seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_truncated_jpeg(path: Path) -> Path:
    data = jpeg_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    return path


def write_bomb_png(path: Path, side: int = 13400) -> Path:
    """A real, valid 1-bit PNG (about 22 kB) of side x side pixels: 13400^2 is over twice Image.MAX_IMAGE_PIXELS,
    so Pillow refuses to open it (DecompressionBombError); 10000^2 is between 1x and 2x (DecompressionBombWarning)."""
    Image.new("1", (side, side)).save(path)
    return path
