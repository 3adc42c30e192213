"""Fully convolutional ResNet18: classify a full-resolution image and see WHERE each class scores.

ResNet18's global average pool becomes a 7x7 average pool with stride 1 and its Linear a 1x1 convolution with
the same weights (models/fcn.py), so on a 224x224 input it gives ResNet18's logits exactly, and on a larger
image one score vector per 224-px-equivalent window (stride 32 px): a class score map.

Prints the top-5 of the FCN on the full image (each class scored by its best location, per-location softmax)
next to the top-5 of the standard ResNet18 on the usual resized + centre-cropped input, the location of the
maximum score, and writes to results/fcn/<image>/:
  score_map.png   the predicted class's score map (logits, one cell per map unit)
  overlay.png     the image with the map (each unit drawn at its receptive-field centre), the max location
                  and the bounding box of the largest region of the thresholded map
  result.json     everything printed
With --tensorboard the two pictures and the result also go to TensorBoard, as the run <log_dir>/fcn/<image name>/.

Without --weights it uses torchvision's ImageNet ResNet18 weights (1000 ImageNet classes); they must be
downloadable or already in the torch hub cache. With --weights, a project resnet18 checkpoint and its classes.

Several images (files, folders, quoted globs) are analysed one after the other with the network loaded once, each
into its own <out_dir>/<image name>/ (<image name>-<hash of its path>/ when another image of that name
has results there); with --json, one JSON object per line. An image that cannot be read
(missing, not an image, truncated, refused by Pillow's decompression-bomb limit) is reported on one line and
skipped; the exit code is then 2.

Examples:
    python fcn_resnet18.py --image photo.jpg
    python fcn_resnet18.py --image shirt_on_bed.png --weights weights/MyData/resnet18/best.pth --json
    python fcn_resnet18.py --image photos/ --weights weights/MyData/resnet18/best.pth
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from utils import cli
from utils.analysis.fcn import fcn_image_tensor, largest_region_box, load_fcn, map_to_image, rank_classes, score_geometry
from utils.analysis.many_images import OUTPUT_RULE, analyse_each, output_names, publish_result
from utils.data.preprocess import eval_transform, load_image
from utils.deploy.predict import expand_images
from utils.errors import InputError
from utils.io import display_path
from utils.tensorboard import add_figure


def get_args_parser():
    p = cli.parser(__doc__)
    p.add_argument("--image", nargs="+", required=True, metavar="IMG",
                   help="image file(s) (JPEG, PNG, ...), folder(s) (searched recursively) or quoted glob(s)")
    p.add_argument("--weights", default=None, metavar="CKPT",
                   help="project resnet18 checkpoint; default: torchvision's ImageNet ResNet18 weights")
    p.add_argument("--max_side", type=cli.non_negative(), default=1024,
                   help="shrink the image so its longer side is at most this many pixels before the FCN (0 = full size)")
    p.add_argument("--threshold", type=cli.in_range(0, 1, low_open=True), default=0.5,
                   help="fraction (0-1] of the min-max normalised score map that defines the object region")
    p.add_argument("--topk", type=cli.positive(), default=5, help="how many classes to list")
    p.add_argument("--out_dir", default="results/fcn", help=OUTPUT_RULE)
    cli.add_device_arg(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    cli.add_tensorboard_args(p, "the score map, the overlay and the result", "fcn/<image name>")
    return p


def check_args(args) -> None:
    if not 0 < args.threshold <= 1:
        raise InputError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.max_side < 0 or args.topk <= 0:
        raise InputError("--max_side must be >= 0 and --topk > 0")


def analyse(args, image: Path, networks: tuple, device) -> dict:
    """Run both networks on the image and compute the map, its maximum and the region box."""
    fcn, resnet, info = networks
    img = load_image(image)
    pre, classes = info.preprocess, info.classes
    x_full, shown = fcn_image_tensor(img, pre, args.max_side)
    x_std = torch.from_numpy(eval_transform(img, pre))[None]
    with torch.no_grad():
        scores = fcn(x_full.to(device))[0].float().cpu()            # (K, h, w) logits
        std_prob = resnet(x_std.to(device))[0].float().softmax(0).cpu()
    k = min(args.topk, len(classes))
    ranked = rank_classes(scores, k)
    std_top = std_prob.topk(k)
    c, h_img, w_img = x_full.shape[1:]
    geo_y, geo_x = score_geometry(fcn, (c, h_img, w_img))
    h_map, w_map = scores.shape[1:]
    centers_y = np.array([geo_y.center(i) for i in range(h_map)])
    centers_x = np.array([geo_x.center(i) for i in range(w_map)])
    best = ranked[0]
    cls_map = scores[best["index"]].numpy()
    iy, ix = np.unravel_index(int(np.argmax(cls_map)), cls_map.shape)
    box, reason = largest_region_box(cls_map, args.threshold, centers_y, centers_x, geo_y.stride, (h_img, w_img))
    (fy0, fy1), (fx0, fx1) = geo_y.span(int(iy)), geo_x.span(int(ix))
    return {
        "image": str(image), "image_size_hw": [img.size[1], img.size[0]], "fcn_input_hw": [h_img, w_img],
        "weights": info.source, "score_map_hw": [h_map, w_map],
        "receptive_field": {"size": geo_y.size, "stride": geo_y.stride, "padding": geo_y.padding},
        "fcn_top": [{"class": classes[r["index"]], "index": r["index"], "prob": r["prob"], "map_location": r["location"]}
                    for r in ranked],
        "standard_top": [{"class": classes[int(i)], "index": int(i), "prob": float(p)}
                         for p, i in zip(std_top.values, std_top.indices)],
        "predicted_class": classes[best["index"]],
        "max_location": {"map_yx": [int(iy), int(ix)], "image_center_yx": [centers_y[iy], centers_x[ix]],
                         "field_box": [max(fy0, 0), max(fx0, 0), min(fy1, h_img - 1), min(fx1, w_img - 1)],
                         "logit": float(cls_map[iy, ix])},
        "threshold": args.threshold, "region_box": list(box) if box else None, "region_note": reason,
        "_arrays": (np.asarray(shown), cls_map, centers_y, centers_x),
    }


def save_figures(res: dict, out_dir: Path, writer=None) -> dict[str, str]:
    """score_map.png and overlay.png; the same figures to TensorBoard when a writer is given."""
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    from utils.plots import save_figure as save_png

    image, cls_map, centers_y, centers_x = res["_arrays"]
    name = res["predicted_class"]
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(cls_map, cmap="viridis")
    ax.set_title(f"score map (logits) of '{name}'\n{cls_map.shape[0]}x{cls_map.shape[1]} units, stride "
                 f"{res['receptive_field']['stride']} px")
    ax.set_xlabel("map x")
    ax.set_ylabel("map y")
    fig.colorbar(im, ax=ax, label="logit")
    if writer is not None:
        add_figure(writer, "fcn/score_map", fig)
    paths = {"score_map": str(save_png(fig, out_dir / "score_map.png"))}

    heat = map_to_image(cls_map, centers_y, centers_x, image.shape[:2])
    fig, ax = plt.subplots(figsize=(7, 7 * image.shape[0] / max(image.shape[1], 1) + 0.6))
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.imshow(heat, cmap="jet", alpha=0.45)
    cy, cx = res["max_location"]["image_center_yx"]
    ax.plot([cx], [cy], marker="x", color="white", markersize=12, mew=3)
    fb = res["max_location"]["field_box"]
    ax.add_patch(patches.Rectangle((fb[1], fb[0]), fb[3] - fb[1], fb[2] - fb[0], fill=False, ec="white", ls="--",
                                   lw=1.5, label="receptive field of the max unit"))
    if res["region_box"]:
        t, left, b, r = res["region_box"]
        ax.add_patch(patches.Rectangle((left, t), r - left, b - t, fill=False, ec="red", lw=2.5,
                                       label=f"region >= {res['threshold']:g} of the map"))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"FCN ResNet18: '{name}' ({res['fcn_top'][0]['prob']:.1%} at its best location)")
    ax.axis("off")
    if writer is not None:
        add_figure(writer, "fcn/overlay", fig)
    paths["overlay"] = str(save_png(fig, out_dir / "overlay.png"))
    return paths


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    images = expand_images(args.image)
    device = cli.resolve_device(args.device)
    networks = load_fcn(args.weights, device)
    several = len(images) > 1
    names = output_names(images, Path(args.out_dir))
    return analyse_each(images, lambda image: analyse(args, image, networks, device),
                        lambda image, res: report(args, image, res, names[image], several=several))


def report(args, image: Path, res: dict, name: str, several: bool) -> None:
    """Write one image's figures and result.json into <out_dir>/<name>/, then print the result (text, or one JSON
    line)."""
    board = Path(args.log_dir) / "fcn" / name if args.tensorboard else None

    def save(out_dir: Path, writer) -> dict[str, str]:
        files = save_figures(res, out_dir, writer)
        res.pop("_arrays")
        return files

    publish_result(res, image, Path(args.out_dir) / name, board, "fcn", save)
    if args.json:
        print(json.dumps(res))
        return
    h, w = res["fcn_input_hw"]
    if several:
        print()
    print(f"image {display_path(res['image'])} ({res['image_size_hw'][0]}x{res['image_size_hw'][1]}), weights: {res['weights']}")
    print(f"FCN input {h}x{w} -> score map {res['score_map_hw'][0]}x{res['score_map_hw'][1]} "
          f"(each unit sees {res['receptive_field']['size']} px, stride {res['receptive_field']['stride']} px)\n")
    print(f"{'FCN on the full image (best location)':<52}  standard ResNet18 (resized + centre crop)")
    for a, b in zip(res["fcn_top"], res["standard_top"]):
        left = f"{a['prob']:6.1%}  {a['class'][:30]:<30} @ map {tuple(a['map_location'])}"
        print(f"{left:<52}  {b['prob']:6.1%}  {b['class']}")
    m = res["max_location"]
    print(f"\nmax score of '{res['predicted_class']}': logit {m['logit']:.3f} at map {tuple(m['map_yx'])}, "
          f"image centre (y, x) = ({m['image_center_yx'][0]:.0f}, {m['image_center_yx'][1]:.0f})")
    box = res["region_box"]
    print(f"region box (top, left, bottom, right): {tuple(box) if box else 'none'} - {res['region_note']}")
    print(f"\nwritten: {', '.join(map(display_path, res['files'].values()))}"
          + (f"\nTensorBoard: {display_path(board)}" if board else ""))


if __name__ == "__main__":
    cli.run(main)
