"""Receptive field by backpropagation: which input pixels can change one unit of the FCN's score map.

The gradient of one output unit with respect to the input image is non-zero exactly on the pixels that unit
depends on. Three fields of the same unit (the predicted class's max-score location, or --pixel Y X):

  theoretical  constant positive weights, batch norm and activations neutralised, max pools made average pools
               (utils.analysis.rf_backprop.theoretical_model): the support is the analytic receptive field, clipped by
               the image border. Checked against receptive_field.py's number for the same layer.
  effective    the real weights: the gradient concentrates in the middle of the field (Luo et al. 2016,
               "Understanding the Effective Receptive Field in Deep CNNs").
  net          the predicted class's whole score map backpropagated, weighted by its positive scores: the
               pixels that make the image that class.

Boxes come from the gradient magnitude normalised to a maximum of 1: the theoretical one from any non-zero
value, the others from values above --threshold. Written to results/receptive_field/<image>/:
max_activation.png (image, score map, max unit, its boxes), receptive_field.png (the three gradients with
their boxes), theoretical_grad.npy / effective_grad.npy / net_grad.npy (raw (C, H, W) input gradients) and
result.json. With --tensorboard the pictures, each field's normalised |gradient| as an image, and the result also go
to TensorBoard, as the run <log_dir>/receptive_field/<image name>/.

Several images (files, folders, quoted globs) are analysed one after the other with the network loaded once, each
into its own <out_dir>/<image name>/ (<image name>-<hash of its path>/ when another image of that name
has results there); with --json, one JSON object per line. An image that cannot be read
(missing, not an image, truncated, refused by Pillow's decompression-bomb limit), or whose score map does not
contain --pixel, is reported on one line and skipped; the exit code is then 2.

Examples:
    python receptive_field_backprop.py --image photo.jpg
    python receptive_field_backprop.py --image photos/ --weights weights/MyData/resnet18/best.pth
    python receptive_field_backprop.py --image photo.jpg --weights weights/MyData/resnet18/best.pth --pixel 3 5
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from utils import cli
from utils.analysis import rf_backprop
from utils.analysis.fcn import fcn_image_tensor, load_fcn, map_to_image, rank_classes, score_geometry
from utils.analysis.many_images import OUTPUT_RULE, analyse_each, output_names, publish_result
from utils.data.preprocess import load_image
from utils.deploy.predict import expand_images
from utils.errors import InputError
from utils.io import atomic_path, display_path
from utils.tensorboard import add_figure


def get_args_parser():
    p = cli.parser(__doc__)
    p.add_argument("--image", nargs="+", required=True, metavar="IMG",
                   help="image file(s) (JPEG, PNG, ...), folder(s) (searched recursively) or quoted glob(s)")
    p.add_argument("--weights", default=None, metavar="CKPT",
                   help="project resnet18 checkpoint; default: torchvision's ImageNet ResNet18 weights")
    p.add_argument("--pixel", type=cli.non_negative(), nargs=2, default=None, metavar=("Y", "X"),
                   help="score-map unit to backpropagate from; default: the predicted class's maximum")
    p.add_argument("--max_side", type=cli.non_negative(), default=512,
                   help="shrink the image so its longer side is at most this many pixels (0 = full size); "
                        "three backward passes at full resolution are slow on a CPU")
    p.add_argument("--threshold", type=cli.in_range(0, 1, low_open=True, high_open=True), default=0.05,
                   help="fraction of the peak |gradient| above which a pixel counts for the effective and net boxes")
    p.add_argument("--out_dir", default="results/receptive_field", help=OUTPUT_RULE)
    cli.add_device_arg(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    cli.add_tensorboard_args(p, "the pictures, the three fields and the result", "receptive_field/<image name>")
    return p


def _box_dict(box):
    return None if box is None else {"top": box[0], "left": box[1], "bottom": box[2], "right": box[3],
                                     "height": box[2] - box[0] + 1, "width": box[3] - box[1] + 1}


def check_args(args) -> None:
    if not 0 <= args.threshold < 1:
        raise InputError(f"--threshold must be in [0, 1), got {args.threshold}")
    if args.max_side < 0:
        raise InputError(f"--max_side must be >= 0, got {args.max_side}")


def analyse(args, image: Path, networks: tuple, device) -> tuple[dict, dict]:
    fcn, _, info = networks
    img = load_image(image)
    classes = info.classes
    x, shown = fcn_image_tensor(img, info.preprocess, args.max_side)
    c, h, w = x.shape[1:]
    with torch.no_grad():
        scores = fcn(x.to(device))[0].float().cpu()
    top = rank_classes(scores, 1)[0]
    cls = top["index"]
    cls_map = scores[cls]
    if args.pixel is None:
        flat = int(cls_map.argmax())
        pixel = (flat // cls_map.shape[1], flat % cls_map.shape[1])
    else:
        pixel = tuple(args.pixel)
        if not (0 <= pixel[0] < cls_map.shape[0] and 0 <= pixel[1] < cls_map.shape[1]):
            raise InputError(f"--pixel {pixel[0]} {pixel[1]} is outside the {cls_map.shape[0]}x{cls_map.shape[1]} score map")
    local = score_geometry(fcn, (c, h, w))
    analytic = rf_backprop.analytic_box(local, pixel, (h, w))
    interior = rf_backprop.is_interior(local, pixel, (h, w))

    theoretical = rf_backprop.input_gradient(rf_backprop.theoretical_model(fcn), x, pixel)
    effective = rf_backprop.input_gradient(fcn, x, pixel, channel=cls)
    weights = torch.relu(cls_map)
    weights = weights / weights.max() if float(weights.max()) > 0 else torch.ones_like(cls_map)
    net = rf_backprop.input_gradient(fcn, x, channel=cls, weights=weights.to(device))

    t_box = rf_backprop.support_box(theoretical, 0.0)
    res = {
        "image": str(image), "fcn_input_hw": [h, w], "weights": info.source,
        "predicted_class": classes[cls], "class_index": cls, "score_map_hw": list(cls_map.shape),
        "pixel": list(pixel), "pixel_is_max": args.pixel is None,
        "analytic": {"rf": local[0].size, "stride": local[0].stride, "padding": local[0].padding,
                     "box": _box_dict(analytic), "interior_yx": list(interior)},
        "theoretical": {"box": _box_dict(t_box), "matches_analytic": t_box == analytic},
        "effective": {"support_box": _box_dict(rf_backprop.support_box(effective, 0.0)),
                      "box": _box_dict(rf_backprop.support_box(effective, args.threshold))},
        "net": {"box": _box_dict(rf_backprop.support_box(net, args.threshold))},
        "threshold": args.threshold,
    }
    arrays = {"image": np.asarray(shown), "theoretical": theoretical, "effective": effective, "net": net,
              "cls_map": cls_map.numpy(), "local": local}
    return res, arrays


def _norm(grad: np.ndarray) -> np.ndarray:
    mag = np.abs(grad).sum(axis=0)
    peak = mag.max()
    return mag / peak if peak > 0 else mag


def field_image(key: str, grad: np.ndarray) -> np.ndarray:
    """A field as a 0-1 grey image at the input's resolution: black outside its support, 0.05-1 inside (the
    theoretical field on a log scale, as in receptive_field.png)."""
    heat = _norm(grad)
    inside = heat > 0
    out = np.zeros(heat.shape, dtype=np.float32)
    if inside.any():
        values = np.log10(heat[inside]) if key == "theoretical" else heat[inside]
        low, high = values.min(), values.max()
        out[inside] = 0.05 + 0.95 * ((values - low) / (high - low) if high > low else 1.0)
    return out


def save_outputs(res: dict, arrays: dict, out_dir: Path, writer=None) -> dict[str, str]:
    """The gradients (.npy) and the two pictures; with a writer, the same figures and each field to TensorBoard."""
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    from utils.plots import save_figure as save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("theoretical", "effective", "net"):
        path = out_dir / f"{name}_grad.npy"
        with atomic_path(path) as tmp:
            np.save(tmp, arrays[name].astype(np.float32))
        files[f"{name}_grad"] = str(path)
    image = arrays["image"]
    gray = image.ndim == 2

    def rect(ax, box, color, label, ls="-"):
        if box:
            ax.add_patch(patches.Rectangle((box["left"] - 0.5, box["top"] - 0.5), box["width"], box["height"],
                                           fill=False, ec=color, lw=2, ls=ls, label=label))

    local = arrays["local"]
    cy, cx = local[0].center(res["pixel"][0]), local[1].center(res["pixel"][1])
    cls_map = arrays["cls_map"]
    centers_y = np.array([local[0].center(i) for i in range(cls_map.shape[0])])
    centers_x = np.array([local[1].center(i) for i in range(cls_map.shape[1])])
    fig, ax = plt.subplots(figsize=(7, 7 * image.shape[0] / max(image.shape[1], 1) + 0.6))
    ax.imshow(image, cmap="gray" if gray else None)
    ax.imshow(map_to_image(cls_map, centers_y, centers_x, image.shape[:2]), cmap="jet", alpha=0.4)
    ax.plot([cx], [cy], marker="x", color="white", markersize=12, mew=3)
    rect(ax, res["analytic"]["box"], "white", f"theoretical field ({res['analytic']['rf']} px, clipped)", "--")
    rect(ax, res["effective"]["box"], "red", f"effective field (> {res['threshold']:g} of peak)")
    ax.legend(loc="lower right", fontsize=8)
    which = "max" if res["pixel_is_max"] else "chosen"
    ax.set_title(f"'{res['predicted_class']}': {which} unit {tuple(res['pixel'])} of the score map")
    ax.axis("off")
    if writer is not None:
        add_figure(writer, "receptive_field/max_activation", fig)
    files["max_activation"] = str(save_png(fig, out_dir / "max_activation.png"))

    fig, axes = plt.subplots(1, 3, figsize=(15, 5 * image.shape[0] / max(image.shape[1], 1) + 0.8))
    panels = (("theoretical", "theoretical field (constant weights)", res["theoretical"]["box"], "white"),
              ("effective", "effective field (real weights)", res["effective"]["box"], "red"),
              ("net", f"net field of '{res['predicted_class']}'", res["net"]["box"], "red"))
    for ax, (key, title, box, color) in zip(axes, panels):
        ax.imshow(image, cmap="gray" if gray else None)
        heat = _norm(arrays[key])
        if key == "theoretical":  # its values span many orders of magnitude: show the support on a log scale
            heat = np.where(heat > 0, np.log10(np.maximum(heat, 1e-300)), np.nan)
        ax.imshow(heat, cmap="inferno", alpha=0.65)
        if writer is not None:  # the field alone, pixel for pixel
            writer.add_image(f"receptive_field/{key}", field_image(key, arrays[key]), dataformats="HW")
        rect(ax, box, color, "box")
        ax.set_title(title + ("\nlog10 |grad|" if key == "theoretical" else "\n|grad| / max"), fontsize=10)
        ax.axis("off")
    if writer is not None:
        add_figure(writer, "receptive_field/fields", fig)
    files["receptive_field"] = str(save_png(fig, out_dir / "receptive_field.png"))
    return files


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    images = expand_images(args.image)
    device = cli.resolve_device(args.device)
    networks = load_fcn(args.weights, device)
    several = len(images) > 1
    names = output_names(images, Path(args.out_dir))
    return analyse_each(images, lambda image: analyse(args, image, networks, device),
                        lambda image, out: report(args, image, *out, names[image], several=several))


def report(args, image: Path, res: dict, arrays: dict, name: str, several: bool) -> None:
    """Write one image's gradients, figures and result.json into <out_dir>/<name>/, then print the result (text, or
    one JSON line)."""
    board = Path(args.log_dir) / "receptive_field" / name if args.tensorboard else None
    publish_result(res, image, Path(args.out_dir) / name, board, "receptive_field",
                   lambda out_dir, writer: save_outputs(res, arrays, out_dir, writer))
    if args.json:
        print(json.dumps(res))
        return
    a, t = res["analytic"], res["theoretical"]
    if several:
        print()

    def fmt(b):
        return "none" if b is None else f"rows {b['top']}-{b['bottom']}, cols {b['left']}-{b['right']} ({b['height']}x{b['width']} px)"

    print(f"image {display_path(res['image'])} as {res['fcn_input_hw'][0]}x{res['fcn_input_hw'][1]}, weights: {res['weights']}")
    print(f"predicted '{res['predicted_class']}'; backpropagating from score-map unit {tuple(res['pixel'])} "
          f"of {res['score_map_hw'][0]}x{res['score_map_hw'][1]}")
    print(f"analytic field     : RF {a['rf']} px, stride {a['stride']} px, padding {a['padding']} px -> {fmt(a['box'])}"
          f" ({'inside the image' if all(a['interior_yx']) else 'clipped by the image border'})")
    print(f"theoretical (grad) : {fmt(t['box'])} -> {'MATCHES' if t['matches_analytic'] else 'DIFFERS FROM'} the analytic field")
    print(f"effective (grad)   : non-zero {fmt(res['effective']['support_box'])}; > {res['threshold']:g} of peak "
          f"{fmt(res['effective']['box'])}")
    print(f"net field of class : > {res['threshold']:g} of peak {fmt(res['net']['box'])}")
    print(f"\nwritten: {', '.join(map(display_path, res['files'].values()))}"
          + (f"\nTensorBoard: {display_path(board)}" if board else ""))


if __name__ == "__main__":
    cli.run(main)
