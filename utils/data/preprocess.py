"""The preprocessing description and the eval transform, implemented once.

This module imports only numpy and Pillow, never torch, so that `predict.py` on an
ONNX file starts fast. Training, eval, export metadata and predict all take the
eval transform from here, so they can never disagree.

The eval transform equals torchvision's `Resize(resize) -> CenterCrop(crop) ->
ToTensor -> Normalize(mean, std)` on PIL images bit for bit (tests check it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.data.folders import has_image_extension, is_ignored_name
from utils.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """Everything needed to turn an image file into the model's input tensor.

    Saved in every checkpoint and in exported artifacts' metadata.
    """

    img_size: int = 224
    resize: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    interpolation: str = "bilinear"
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_size(cls, img_size: int, channels: int = 3) -> Preprocess:
        """The seed's recipe (resize 256, crop 224) scaled to any crop size."""
        mean = IMAGENET_MEAN if channels == 3 else (float(np.mean(IMAGENET_MEAN)),)
        std = IMAGENET_STD if channels == 3 else (float(np.mean(IMAGENET_STD)),)
        return cls(img_size=img_size, resize=round(img_size * 256 / 224), mean=mean, std=std, channels=channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["mean"], known["std"] = tuple(known.get("mean", IMAGENET_MEAN)), tuple(known.get("std", IMAGENET_STD))
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        return cls.from_dict(json.loads(text))


_PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow image (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to RGB or L."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = 1.0 if arr.max() <= 1.0 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    target = "RGB" if channels == 3 else "L"
    return img.convert(target) if img.mode != target else img


def load_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Read an image with EXIF orientation applied, as RGB (channels=3) or L (channels=1).

    Raises InputError naming the file for every way a file can fail to decode (missing, not an image, truncated or
    corrupt, refused by Pillow's decompression-bomb limit), so no caller needs its own list of decoder exceptions.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_model_mode(img, channels)
    except UnidentifiedImageError:
        raise InputError(f"not an image file: {path} (use JPEG, PNG, BMP, TIFF, WebP or GIF)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"Pillow refused {path}: {e} (its safety limit against decompression bombs; raise "
                         "PIL.Image.MAX_IMAGE_PIXELS only for images you trust)") from None
    except (OSError, SyntaxError, ValueError, MemoryError) as e:
        raise InputError(f"cannot read image {path}: {e} (the file is truncated or corrupt)") from None


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so the shorter side is `size`, as torchvision's Resize(int) does."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), _PIL_INTERPOLATION[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the centre `size`x`size`, padding with zeros if the image is smaller (as torchvision)."""
    w, h = img.size
    if w < size or h < size:
        padded = Image.new(img.mode, (max(w, size), max(h, size)))
        padded.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = padded, padded.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def scale_and_normalize(pixels, mean, std):
    """(pixels / 255 - mean) / std for float32 numpy arrays or torch tensors alike (mean/std of the same kind,
    shaped to broadcast over the channel axis): one formula, the same float32 operations in the same order, so
    the per-image numpy path (predict, eval) and the batched torch path (tensor pipeline) agree bit for bit."""
    return (pixels / 255.0 - mean) / std


def denormalize(chw: np.ndarray, pre: Preprocess) -> np.ndarray:
    """A normalised CHW float array (the network's input) back to an HWC uint8 picture: the inverse of
    scale_and_normalize, clipped to 0-255, so a grid shows the images as the network sees them."""
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    pixels = (np.asarray(chw, dtype=np.float32) * std + mean) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def normalize(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """PIL image -> float32 CHW array scaled to [0, 1] then normalised by mean/std."""
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray(scale_and_normalize(arr.transpose(2, 0, 1), mean, std))


def eval_transform(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """The eval transform: resize shorter side, centre crop, scale, normalise. Returns CHW float32."""
    img = to_model_mode(img, pre.channels)
    img = center_crop(resize_shorter(img, pre.resize, pre.interpolation), pre.img_size)
    return normalize(img, pre)


def preprocess_file(path: str | Path, pre: Preprocess) -> np.ndarray:
    """Read one image file and return the model input as a CHW float32 array."""
    return eval_transform(load_image(path, pre.channels), pre)


def list_images(spec: str | Path | list) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of image paths.

    Paths that do not exist are kept so the caller can report them one by one.
    """
    import glob

    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            # the image files a training folder would use (utils.data.folders: Pillow's formats, no hidden or junk files)
            out.extend(sorted(q for q in p.rglob("*") if has_image_extension(q.name) and q.is_file()
                              and not any(is_ignored_name(part) for part in q.relative_to(p).parts)))
        elif any(ch in str(s) for ch in "*?["):
            out.extend(sorted(Path(q) for q in glob.glob(str(s), recursive=True) if Path(q).is_file()))
        else:
            out.append(p)
    return out
