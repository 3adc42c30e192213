"""Where a heat map computed on the network's input lies on the original image: the eval transform
(utils.data.preprocess: shorter side resized to `resize`, centre crop of `img_size`, zero padding when the resized
image is smaller) undone exactly, and the peak and the box of the hottest region read in original pixels.

Torch-free, so the geometry is tested on its own against the real transform (tests/test_explain.py).

Conventions: pixel (x, y) covers [x, x+1) x [y, y+1) and its centre is (x + 0.5, y + 0.5); Pillow's resize maps
centres onto centres (x_resized + 0.5 = (x + 0.5) * resized_width / width), the crop is a shift by whole pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.data.preprocess import Preprocess, resized_size
from utils.regions import component


@dataclass(frozen=True)
class CropMap:
    """The eval transform of one image of width x height pixels, as a scale and a shift per axis:
    crop_x + 0.5 = (x + 0.5) * scale_x - offset_x (and the same for y)."""

    width: int
    height: int
    size: int  # the crop's side (the network's input)
    scale_x: float
    scale_y: float
    offset_x: int  # crop start in the resized-and-padded image
    offset_y: int

    @classmethod
    def of(cls, width: int, height: int, pre: Preprocess) -> CropMap:
        rw, rh = resized_size(width, height, pre.resize)
        size = pre.img_size
        # center_crop pads a smaller image with zeros, centred, then crops at round((side - size) / 2)
        pad_x, pad_y = (max(rw, size) - rw) // 2, (max(rh, size) - rh) // 2
        left = int(round((max(rw, size) - size) / 2.0))
        top = int(round((max(rh, size) - size) / 2.0))
        return cls(width, height, size, rw / width, rh / height, left - pad_x, top - pad_y)

    def to_crop(self, x, y):
        """Original pixel coordinates (continuous, pixel centres at .5) -> crop coordinates (same convention)."""
        return (np.asarray(x, dtype=np.float64) * self.scale_x - self.offset_x,
                np.asarray(y, dtype=np.float64) * self.scale_y - self.offset_y)

    def to_original(self, cx, cy):
        """Crop coordinates -> original coordinates (the inverse of to_crop)."""
        return ((np.asarray(cx, dtype=np.float64) + self.offset_x) / self.scale_x,
                (np.asarray(cy, dtype=np.float64) + self.offset_y) / self.scale_y)

    def pixel_to_original(self, col: int, row: int) -> tuple[int, int]:
        """The original pixel holding the centre of crop pixel (col, row), clipped to the image."""
        x, y = self.to_original(col + 0.5, row + 0.5)
        return (int(min(self.width - 1, max(0, np.floor(x)))), int(min(self.height - 1, max(0, np.floor(y)))))

    def box_to_original(self, x0: int, y0: int, x1: int, y1: int) -> tuple[int, int, int, int]:
        """Crop pixels x0..x1, y0..y1 (inclusive) -> the original pixels they cover (inclusive, clipped)."""
        ox0, oy0 = self.to_original(x0, y0)
        ox1, oy1 = self.to_original(x1 + 1, y1 + 1)
        def clip(v: float, n: int) -> int:
            return int(min(n - 1, max(0, v)))

        return (clip(np.floor(ox0), self.width), clip(np.floor(oy0), self.height),
                clip(np.ceil(ox1) - 1, self.width), clip(np.ceil(oy1) - 1, self.height))

    def heat_on_original(self, heat: np.ndarray) -> np.ndarray:
        """A (size, size) heat map resampled onto every original pixel (bilinear between crop-pixel centres);
        NaN where the original pixel falls outside the crop (the network never saw it)."""
        heat = np.asarray(heat, dtype=np.float32)
        cx, _ = self.to_crop(np.arange(self.width) + 0.5, 0.0)
        _, cy = self.to_crop(0.0, np.arange(self.height) + 0.5)
        centres = np.arange(self.size) + 0.5
        rows = np.stack([np.interp(cx, centres, row) for row in heat]).astype(np.float32)       # (size, W)
        out = np.stack([np.interp(cy, centres, rows[:, j]) for j in range(self.width)], axis=1)  # (H, W)
        outside_x = (cx < 0) | (cx > self.size)
        outside_y = (cy < 0) | (cy > self.size)
        out = out.astype(np.float32)
        out[:, outside_x] = np.nan
        out[outside_y, :] = np.nan
        return out


@dataclass(frozen=True)
class Hotspot:
    """The heat map's maximum and the bounding box of the hottest region, in crop and original pixels; None
    when the map is flat (nothing stands out)."""

    peak_crop: tuple[int, int]  # (x, y)
    peak: tuple[int, int]  # (x, y) in the original image
    box_crop: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    box: tuple[int, int, int, int]  # in the original image


def hottest_region(heat: np.ndarray, quantile: float) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1, inclusive) of the 8-connected region around the maximum of the pixels in the
    hottest `quantile` share of the map (e.g. 0.2: at or above its 80th percentile); None for a flat map."""
    heat = np.asarray(heat, dtype=np.float64)
    lo, hi = float(heat.min()), float(heat.max())
    if not np.isfinite(hi) or hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return None
    threshold = min(float(np.quantile(heat, 1.0 - quantile)), hi)
    y0, x0 = np.unravel_index(int(np.argmax(heat)), heat.shape)
    ys, xs = component(heat >= threshold, (int(y0), int(x0)), diagonal=True)
    return int(min(xs)), int(min(ys)), int(max(xs)), int(max(ys))


def hotspot(heat: np.ndarray, crop: CropMap, quantile: float) -> Hotspot | None:
    """Peak and hottest-region box of a (size, size) heat map, mapped onto the original image."""
    box = hottest_region(heat, quantile)
    if box is None:
        return None
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return Hotspot((int(col), int(row)), crop.pixel_to_original(int(col), int(row)), box, crop.box_to_original(*box))
