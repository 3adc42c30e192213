"""The picture of one explanation: the heat map blended over the original image (its own size and aspect; images
smaller than OVERLAY_MIN_SIDE are enlarged by a whole factor, pixels kept square and sharp), the peak (a cross),
the box of the hottest region (white), optionally the receptive field of the peak's unit (cyan), and a band above
with the class, its probability and the method. What the network never saw (cropped away by the eval transform)
is dimmed."""

from __future__ import annotations

import math

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

OVERLAY_MIN_SIDE = 224  # px: a 28 px image is drawn 8x larger so the band's text and the marks stay readable
HEAT_ALPHA = 0.55  # opacity of the hottest colour; cold pixels show the image as it is


def blend(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image + (H, W) heat (NaN outside the network's view) -> blended uint8 image."""
    seen = np.isfinite(heat)
    peak = float(np.nanmax(heat)) if seen.any() else 0.0
    norm = np.where(seen, np.nan_to_num(heat) / peak, 0.0) if peak > 0 else np.zeros_like(heat, dtype=np.float64)
    colours = colormaps["jet"](norm)[..., :3] * 255.0
    alpha = (HEAT_ALPHA * norm)[..., None]
    out = rgb.astype(np.float64) * (1 - alpha) + colours * alpha
    out[~seen] *= 0.45
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def wrap(line: str, font, width: float) -> str:
    """`line` broken at spaces into lines of at most `width` pixels in `font` (a word longer than that stays whole)."""
    out: list[str] = []
    for word in line.split(" "):
        if out and font.getlength(out[-1] + " " + word) <= width:
            out[-1] += " " + word
        else:
            out.append(word)
    return "\n".join(out)


def draw_overlay(img: Image.Image, heat: np.ndarray, title: str, peak: tuple[int, int] | None = None,
                 box: tuple[int, int, int, int] | None = None,
                 field: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The overlay as a PIL image: `heat` on `img`'s pixel grid, marks in original pixel coordinates (inclusive
    boxes x0, y0, x1, y1)."""
    rgb = np.asarray(img.convert("RGB"))
    scale = max(1, math.ceil(OVERLAY_MIN_SIDE / max(1, min(rgb.shape[:2]))))
    picture = Image.fromarray(blend(rgb, heat))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=13)
    title = "\n".join(wrap(line, font, picture.width - 8) for line in title.split("\n"))
    band = 17 * (1 + title.count("\n")) + 4
    canvas = Image.new("RGB", (picture.width, picture.height + band), (255, 255, 255))
    canvas.paste(picture, (0, band))
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((4, 3), title, fill=(0, 0, 0), font=font, spacing=4)
    width = max(1, round(min(picture.size) / 150))

    def rect(b, colour):
        x0, y0, x1, y1 = b
        draw.rectangle((x0 * scale, band + y0 * scale, (x1 + 1) * scale - 1, band + (y1 + 1) * scale - 1),
                       outline=colour, width=width)

    if field is not None:
        rect(field, (0, 255, 255))
    if box is not None:
        rect(box, (255, 255, 255))
    if peak is not None:
        cx, cy = (peak[0] + 0.5) * scale, band + (peak[1] + 0.5) * scale
        r = max(4, 3 * width)
        for colour, w in (((0, 0, 0), width + 2), ((255, 255, 255), width)):
            draw.line((cx - r, cy, cx + r, cy), fill=colour, width=w)
            draw.line((cx, cy - r, cx, cy + r), fill=colour, width=w)
    return canvas
