"""explain.py's loop: images decoded as predict decodes them (the checkpoint's eval transform), explained in batches,
one overlay PNG and one output row per image. A bad file (missing, not an image, truncated, over the pixel limit) or
NaN scores is one `error:` line on stderr and a row with `error` set; the others go on, the exit code is then 2.

Rows (CSV or JSON Lines, ROW_FIELDS): the top-1 class and probability, the class explained, the method, the heat
map's maximum (peak_x, peak_y) and the bounding box of the hottest region (box_x0..box_y1, inclusive), all in the
ORIGINAL image's pixels (utils.explain.geometry undoes the resize and centre crop); peak and box are empty when the
heat map is flat (nothing stands out).
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.data.preprocess import Preprocess, eval_transform, load_image
from utils.errors import InputError
from utils.explain.attribution import Logits, heat_maps, probabilities
from utils.explain.geometry import CropMap, hotspot
from utils.explain.overlay import draw_overlay
from utils.io import atomic_path, display_line, display_path, path_tag
from utils.progress import bar

ROW_FIELDS = ("path", "top1_class", "top1_prob", "target_class", "method", "peak_x", "peak_y",
              "box_x0", "box_y0", "box_x1", "box_y1", "error")
METHOD_NAMES = {"gradcam": "Grad-CAM", "occlusion": "occlusion", "integrated_gradients": "integrated gradients"}

# crop-pixel peak (x, y) -> the inclusive crop box (x0, y0, x1, y1) of the receptive field of the unit there
FieldOf = Callable[[tuple[int, int]], tuple[int, int, int, int]]


@dataclass(frozen=True)
class ExplainOptions:
    method: str = "gradcam"
    layer: str | None = None  # Grad-CAM's layer (utils.explain.attribution.choose_layer)
    target: int | None = None  # class index to explain; None: each image's top-1 class
    box_quantile: float = 0.2
    batch_size: int = 16
    temperature: float = 1.0  # the checkpoint's calibration (eval.py --calibrate): probabilities only
    out_dir: Path | None = None  # overlay PNGs; None: none written


def overlay_names(paths: Sequence[Path], method: str) -> dict[Path, str]:
    """<stem>_<method>.png, or <stem>-<8 hex digits of the path's sha256>_<method>.png when inputs share a stem."""
    stems = Counter(p.stem for p in paths)
    out = {}
    for p in paths:
        tag = "" if stems[p.stem] == 1 else "-" + path_tag(p)
        out[p] = f"{p.stem}{tag}_{method}.png"
    return out


def _decode(path: Path, pre: Preprocess) -> tuple[Image.Image, np.ndarray] | str:
    try:
        img = load_image(path, pre.channels, pre.resize)
        return img, eval_transform(img, pre)
    except InputError as e:
        return str(e)


def _batches(paths: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(paths), size):
        yield paths[i:i + size]


def explain_images(model: Logits, classes: Sequence[str], pre: Preprocess, paths: Sequence[Path], opts: ExplainOptions,
                   device: torch.device, field_of: FieldOf | None = None, show_progress: bool = True) -> Iterator[dict]:
    """One row per path (ROW_FIELDS), in input order; writes each overlay under opts.out_dir."""
    names = overlay_names(paths, opts.method)
    progress = bar(total=len(paths), enabled=show_progress and len(paths) > 1, desc=f"explain ({opts.method})", unit="img")
    try:
        for chunk in _batches(paths, opts.batch_size):
            decoded = [(p, _decode(p, pre)) for p in chunk]
            good = [(p, d) for p, d in decoded if not isinstance(d, str)]
            results: dict[Path, dict] = {}
            if good:
                x = torch.from_numpy(np.stack([d[1] for _, d in good])).to(device)
                probs = probabilities(model, x, opts.temperature).cpu()
                top_p, top_i = probs.max(1)
                finite = torch.isfinite(probs).all(1)
                targets = torch.full_like(top_i, opts.target) if opts.target is not None else top_i
                heat = heat_maps(model, x, targets.to(device), opts.method, opts.layer, opts.batch_size).cpu().numpy()
                for k, (path, (img, _)) in enumerate(good):
                    if not finite[k]:
                        results[path] = {"error": f"model produced NaN probabilities for {path}: its weights are broken "
                                                  "(a diverged training run?); use a checkpoint saved before it went wrong"}
                        continue
                    results[path] = _explain_one(path, img, heat[k], classes, float(top_p[k]), int(top_i[k]),
                                                 int(targets[k]), float(probs[k, targets[k]]), pre, opts, names[path], field_of)
            for path, d in decoded:
                row = results.get(path, {"error": d if isinstance(d, str) else None})
                progress.update(1)
                yield {"path": str(path), **{k: row.get(k) for k in ROW_FIELDS if k != "path"}}
    finally:
        progress.close()


def _explain_one(path: Path, img: Image.Image, heat: np.ndarray, classes: Sequence[str], top_p: float, top_i: int,
                 target: int, target_p: float, pre: Preprocess, opts: ExplainOptions, name: str,
                 field_of: FieldOf | None) -> dict:
    crop = CropMap.of(img.width, img.height, pre)
    hot = hotspot(heat, crop, opts.box_quantile)
    row = {"top1_class": classes[top_i], "top1_prob": round(top_p, 6), "target_class": classes[target],
           "method": opts.method, "error": None}
    field = None
    if hot is not None:
        row.update(peak_x=hot.peak[0], peak_y=hot.peak[1], box_x0=hot.box[0], box_y0=hot.box[1], box_x1=hot.box[2],
                   box_y1=hot.box[3])
        if field_of is not None:
            field = crop.box_to_original(*field_of(hot.peak_crop))
    if opts.out_dir is not None:
        title = f"{classes[top_i]} {top_p:.1%}"
        if target != top_i:
            title += f"  |  explaining {classes[target]} ({target_p:.1%})"
        title += f"\n{METHOD_NAMES[opts.method]}" + (f" on {opts.layer}" if opts.layer else "")
        title += "" if hot else " (flat: nothing stands out)"
        if field is not None:
            title += "\ncyan: receptive field of the peak"
        picture = draw_overlay(img, crop.heat_on_original(heat), title, hot.peak if hot else None,
                               hot.box if hot else None, field)
        with atomic_path(opts.out_dir / name) as tmp:
            picture.save(tmp, format="PNG")
    return row


def write_rows(rows: Iterator[dict], output: tuple[Path, str] | None) -> tuple[int, int]:
    """Print each bad image's error line; stream rows to `output` ((path, "csv"|"jsonl"), written under a temporary
    name and renamed when complete) or print one line per image. Returns (images, failed)."""
    count = failed = 0

    def each(emit: Callable[[dict], None]) -> None:
        nonlocal count, failed
        for row in rows:
            count += 1
            if row["error"]:
                failed += 1
                print(f"error: {display_line(row['error'])}", file=sys.stderr)
            emit(row)

    if output is None:
        def show(row: dict) -> None:
            if row["error"]:
                return
            where = (f"peak ({row['peak_x']}, {row['peak_y']}) box ({row['box_x0']}, {row['box_y0']})-({row['box_x1']}, "
                     f"{row['box_y1']})" if row["peak_x"] is not None else "flat heat map")
            print(f"{display_path(row['path'])}: {row['top1_class']} {row['top1_prob']:.4f}, {row['target_class']} "
                  f"explained, {where}")
        each(show)
        return count, failed
    path, fmt = output
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        if fmt == "csv":
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            each(lambda row: writer.writerow({k: "" if v is None else v for k, v in row.items()}))
        else:
            each(lambda row: f.write(json.dumps(row) + "\n"))
    return count, failed
