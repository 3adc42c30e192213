"""The preprocessing description and the eval transform, implemented once.

This module imports only numpy and Pillow, never torch, so that `predict.py` on an
ONNX file starts fast. Training, eval, export metadata and predict all take the
eval transform from here, so they can never disagree.

The eval transform equals torchvision's `Resize(resize) -> CenterCrop(crop) ->
ToTensor -> Normalize(mean, std)` on PIL images bit for bit (tests check it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.data.formats import has_image_extension, is_ignored_name
from utils.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEED_CROP_PCT = 224 / 256  # the seed's (and timm's default) eval geometry: resize 256, centre-crop 224


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
    # img_size / resize, timm's name for the eval geometry: recorded since --crop_pct; None in older checkpoints and
    # artifacts, whose `resize` is the whole story (the transform reads `resize` only, so they behave as before)
    crop_pct: float | None = None

    @classmethod
    def for_size(cls, img_size: int, channels: int = 3, crop_pct: float = SEED_CROP_PCT) -> Preprocess:
        """The eval geometry for a crop of img_size px: resize the shorter side to round(img_size / crop_pct), then
        centre-crop (crop_pct 0.875 is the seed's 256 -> 224 scaled to any size; 1.0 keeps the whole image)."""
        if not 0 < crop_pct <= 1:
            raise InputError(f"--crop_pct must be in (0, 1], got {crop_pct}")
        mean = IMAGENET_MEAN if channels == 3 else (float(np.mean(IMAGENET_MEAN)),)
        std = IMAGENET_STD if channels == 3 else (float(np.mean(IMAGENET_STD)),)
        return cls(img_size=img_size, resize=round(img_size / crop_pct), mean=mean, std=std, channels=channels,
                   crop_pct=crop_pct)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> Preprocess:
        """The preprocessing a checkpoint or an artifact stores, every value checked (check_preprocess_values): an
        edited or damaged file is one line naming the key, not a traceback deep in the transform."""
        where = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise InputError(f"{where}its preprocessing is {type(d).__name__}, not a mapping of keys (img_size, resize, "
                             f"mean, std, ...){FILE_FIX}")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        check_preprocess_values(known, where)
        known["mean"], known["std"] = tuple(known.get("mean", IMAGENET_MEAN)), tuple(known.get("std", IMAGENET_STD))
        return cls(**known)

    @classmethod
    def from_json(cls, text: str, source: str = "") -> Preprocess:
        try:
            d = json.loads(text)
        except ValueError as e:
            where = f"{source}: " if source else ""
            raise InputError(f"{where}its preprocessing is not valid JSON ({e}){FILE_FIX}") from None
        return cls.from_dict(d, source)


FILE_FIX = "; fix: use the file as train.py or export.py wrote it (it was edited or damaged)"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_preprocess_values(d: dict, where: str = "") -> None:
    """InputError naming the first key of a preprocessing mapping whose value has the wrong type or range."""
    def bad(key: str, expected: str) -> InputError:
        return InputError(f"{where}preprocess key {key!r} must be {expected}, got {d[key]!r}{FILE_FIX}")

    for key in ("img_size", "resize"):
        if key in d and not (_is_int(d[key]) and d[key] > 0):
            raise bad(key, "a positive integer (pixels)")
    if "channels" in d and not (_is_int(d["channels"]) and d["channels"] in (1, 3)):
        raise bad("channels", "1 or 3")
    channels = d.get("channels", 3)
    for key in ("mean", "std"):
        if key not in d:
            continue
        values = d[key]
        if (not isinstance(values, (list, tuple)) or len(values) not in (1, channels)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
                or (key == "std" and not all(v > 0 for v in values))):
            what = "positive numbers" if key == "std" else "numbers"
            raise bad(key, f"a list of 1 or {channels} (channels) finite {what}")
    if "interpolation" in d and d["interpolation"] not in _PIL_INTERPOLATION:
        raise bad("interpolation", f"one of {', '.join(_PIL_INTERPOLATION)}")
    if "extra" in d and not isinstance(d["extra"], dict):
        raise bad("extra", "a mapping")
    if d.get("crop_pct") is not None:
        pct = d["crop_pct"]
        if not (isinstance(pct, (int, float)) and not isinstance(pct, bool) and 0 < pct <= 1):
            raise bad("crop_pct", "a number in (0, 1] (img_size / resize)")
        if _is_int(d.get("img_size")) and _is_int(d.get("resize")) and round(d["img_size"] / pct) != d["resize"]:
            raise bad("crop_pct", f"img_size / resize ({d['img_size']} / {d['resize']})")


_PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def value_range(img: Image.Image) -> tuple[float, float]:
    """The pixel values that become black and white (0 and 255) for the images without a fixed 8-bit range.

    16-bit modes (I;16*): 0-65535, the format's range. 32-bit integer (I) and float (F) images declare no range, so
    it is taken from the values: within 0-255 (0-1 for floats) they are already 8-bit (or unit) levels; integers
    within 0-65535 are 16-bit levels; anything else (a 32-bit range, negative values) is scaled from its actual
    minimum to its maximum. An image whose values cannot be scaled (NaN or infinite floats; one single value outside
    those ranges, so nothing tells which grey it is) raises InputError saying why."""
    if img.mode in SIXTEEN_BIT_MODES:
        return 0.0, 65535.0
    arr = np.asarray(img)
    if img.mode == "F" and not np.isfinite(arr).all():
        raise InputError("its float pixels include NaN or infinite values, which have no grey level; fix: save the "
                         "image with finite values (or as 8/16-bit)")
    low, high = float(arr.min()), float(arr.max())
    if low >= 0 and high <= 1 and img.mode == "F":
        return 0.0, 1.0
    if low >= 0 and high <= 255:
        return 0.0, 255.0
    if low >= 0 and high <= 65535 and img.mode == "I":
        return 0.0, 65535.0
    if high == low:
        raise InputError(f"every pixel of this {'32-bit integer' if img.mode == 'I' else 'float'} image has the value "
                         f"{high:g}, outside 0-255 and 0-65535, so no grey level follows from it; fix: save it as an "
                         "8- or 16-bit image")
    return low, high


def pixel_problem(img: Image.Image) -> str | None:
    """Why the pixel values of `img` cannot be scaled to 8-bit (value_range's refusal), or None: the folder check
    (utils.data.folders.check_image) refuses such files before training like any unreadable image."""
    if img.mode not in ("I", "F"):
        return None
    try:
        value_range(img)
    except InputError as e:
        return str(e)
    return None


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow image (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to RGB or L; 16-bit, 32-bit integer and float
    images are scaled to 0-255 by value_range."""
    if img.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        low, high = value_range(img)
        arr = (np.asarray(img, dtype=np.float64) - low) / (high - low) * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    target = "RGB" if channels == 3 else "L"
    return img.convert(target) if img.mode != target else img


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after the shorter side is resized to `size`, as torchvision's Resize(int) computes it."""
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return width, height
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def oversize_reason(width: int, height: int, resize: int | None = None) -> str | None:
    """Why an image of width x height pixels would cost too much memory to use, or None: the ONE limit that the
    training check (utils.data.folders.check_image), the loaders, the cache and predict all apply, from the header
    before any decoding. Both the decoded image and the image the pipeline's resize (shorter side to `resize`) makes
    of it must stay within Pillow's pixel limit (PIL.Image.MAX_IMAGE_PIXELS, 89,478,485 by default: 268 MB as RGB).
    Why both: a few-kB PNG of 1 x 1,000,000 px decodes in 1 MB, but resized to a 32 px shorter side it would be
    32 x 32,000,000 px (3 GB), and the process would be killed for memory with no message."""
    limit = Image.MAX_IMAGE_PIXELS
    if not limit:  # the user switched Pillow's limit off: they trust their images
        return None
    if width * height > limit:
        return (f"{width}x{height} = {width * height} pixels, over Pillow's decompression-bomb limit of {limit} "
                "(PIL.Image.MAX_IMAGE_PIXELS)")
    if resize:
        new_w, new_h = resized_size(width, height, resize)
        if new_w * new_h > limit:
            return (f"{width}x{height} pixels: resized to {resize} px on the shorter side it would be {new_w}x{new_h} = "
                    f"{new_w * new_h} pixels, over the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS; its sides are too "
                    "unequal)")
    return None


def load_image(path: str | Path, channels: int = 3, resize: int | None = None) -> Image.Image:
    """Read an image with EXIF orientation applied, as RGB (channels=3) or L (channels=1).

    Raises InputError naming the file for every way a file can fail to decode (missing, not an image, truncated or
    corrupt, over the pixel limit of oversize_reason for the `resize` the caller will apply, pixel values that
    cannot be scaled), so no caller needs its own list of decoder exceptions. The size is checked from the header,
    before the pixels are decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            reason = oversize_reason(*img.size, resize)  # from the header: nothing decoded yet
            if reason is None:
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_model_mode(img, channels)
    except InputError as e:  # value_range: pixel values without a grey level
        raise InputError(f"cannot use image {path}: {e}") from None
    except UnidentifiedImageError:
        raise InputError(f"not an image file: {path} (use JPEG, PNG, BMP, TIFF, WebP or GIF)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"Pillow refused {path}: {e} (its safety limit against decompression bombs; raise "
                         "PIL.Image.MAX_IMAGE_PIXELS only for images you trust)") from None
    except (OSError, SyntaxError, ValueError, MemoryError) as e:
        raise InputError(f"cannot read image {path}: {e} (the file is truncated or corrupt)") from None
    raise InputError(f"cannot use image {path}: {reason}; fix: crop or shrink the file, or leave it out")


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so the shorter side is `size`, as torchvision's Resize(int) does."""
    new_size = resized_size(*img.size, size)
    return img if new_size == img.size else img.resize(new_size, _PIL_INTERPOLATION[interpolation])


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
    """Read one image file and return the model input as a CHW float32 array (refused, like in training, when its
    size or its resize would exceed oversize_reason's limit)."""
    return eval_transform(load_image(path, pre.channels, pre.resize), pre)


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
