"""Explain predictions: where in each image the network found its class, as a heat map over the original image.

Examples:
  python explain.py --weights weights/FashionMNIST/custom/best.pth --image shoe.png
  python explain.py --weights best.pth --image photos/ --method occlusion --output explained.csv
  python explain.py --weights best.pth --image shirt.png --target_class Pullover --layer features.6 --receptive_field

Methods (through Captum): gradcam (default; a convolutional layer, chosen automatically or --layer), occlusion (no
gradients: gray squares slid over the image) and integrated_gradients (pixel-level). Each image gives
<out_dir>/<stem>_<method>.png (heat map, peak, box of the hottest region) and one row (--output: CSV or JSON Lines;
else one line per image): top-1 class and probability, the class explained, the peak and the box in the original
image's pixels. A bad image is one error line and skipped; the exit code is then 2. See docs/explain.md.
"""

from __future__ import annotations

import argparse
import copy
import sys

from utils import cli, progress
from utils.analysis.rf_trace import receptive_fields
from utils.checkpoint import build_from_checkpoint, load_checkpoint
from utils.deploy.predict import check_output, expand_images
from utils.errors import InputError
from utils.explain.attribution import METHODS, LayerChoice, Logits, choose_layer, class_index
from utils.explain.run import ExplainOptions, explain_images, write_rows
from utils.io import display_path, make_dirs


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--weights", required=True, metavar="CKPT", help="checkpoint written by train.py (any model)")
    cli.add_model_override_arg(p)
    p.add_argument("--image", nargs="+", required=True, metavar="IMG",
                   help="image file(s), folder(s) (searched recursively) or quoted glob(s) such as 'imgs/*.jpg'")
    p.add_argument("--method", default="gradcam", choices=METHODS, help="how the heat map is computed (docs/explain.md)")
    p.add_argument("--target_class", default=None, metavar="NAME", help="class to explain; none: each image's predicted class")
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="Grad-CAM's layer, e.g. layer3 or features.6; none: the last stage with a map of >= 7 x 7")
    p.add_argument("--box_quantile", type=cli.in_range(0, 1, low_open=True, high_open=True), default=0.2,
                   help="the box frames the hottest region: this share of the heat map's pixels, the hottest ones")
    p.add_argument("--receptive_field", action="store_true",
                   help="also draw the receptive field of the Grad-CAM layer's unit at the peak (cyan)")
    p.add_argument("--batch_size", type=cli.positive(), default=16, help="images explained per batch")
    p.add_argument("--out_dir", default="results/explain", help="folder of the overlay PNGs")
    p.add_argument("--output", default=None, metavar="FILE.csv|FILE.jsonl",
                   help="write one row per image (path, classes, peak, box, error) to this CSV or JSON Lines file")
    p.add_argument("--exist_ok", action="store_true", help="allow --output to replace an existing file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_device_arg(p)
    return p


def field_function(model, layer: LayerChoice, channels: int, size: int):
    """crop peak (x, y) -> crop box of the receptive field of the `layer` unit nearest to it (utils.analysis.rf_trace
    on a meta-device copy: nothing computed); None when the trace cannot follow that layer."""
    report = receptive_fields(copy.deepcopy(model).to("meta"), (channels, size, size), device="meta")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # definition order = execution order here
    last = max(i for name, i in order.items() if name == layer.name or name.startswith(layer.name + "."))
    # the rows are the operations that change a field (convolutions, pools): the layer's field is the last one at or
    # before it (a ReLU or a norm layer keeps its input's field)
    row = next((r for r in reversed(report.layers) if r.rf is not None and order.get(r.layer, last + 1) <= last), None)
    if row is None:
        return None
    (rf_y, rf_x), (st_y, st_x), (pad_y, pad_x) = row.rf, row.stride, row.padding
    h, w = layer.shape[1:]

    def span(p: int, rf: int, stride: int, pad: int, n: int) -> tuple[int, int]:
        i = min(n - 1, max(0, round((p + pad - (rf - 1) / 2) / stride)))
        start = i * stride - pad
        return max(0, start), min(size - 1, start + rf - 1)

    def field_of(peak: tuple[int, int]) -> tuple[int, int, int, int]:
        x0, x1 = span(peak[0], rf_x, st_x, pad_x, w)
        y0, y1 = span(peak[1], rf_y, st_y, pad_y, h)
        return x0, y0, x1, y1

    return field_of


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    progress.set_quiet(args.quiet)
    output = check_output(args.output, args.exist_ok)  # before any work: never replace a file by accident
    paths = expand_images(args.image)
    device = cli.resolve_device(args.device)
    ckpt = load_checkpoint(args.weights)
    net, info = build_from_checkpoint(ckpt, args.model, source=args.weights)
    pre, classes = info.preprocess, info.classes
    target = class_index(classes, args.target_class) if args.target_class is not None else None
    layer, field_of = None, None
    if args.method == "gradcam":
        layer = choose_layer(net, pre.channels, pre.img_size, args.layer)
        print(layer.describe(pre.img_size), file=sys.stderr)
        if args.receptive_field:
            field_of = field_function(net, layer, pre.channels, pre.img_size)
    elif args.layer or args.receptive_field:
        raise InputError(f"--layer and --receptive_field belong to --method gradcam, not {args.method}: drop them")
    for p in net.parameters():
        p.requires_grad_(False)  # gradients flow to the input and the layer only
    out_dir = make_dirs(args.out_dir)
    opts = ExplainOptions(args.method, layer.name if layer else None, target, args.box_quantile, args.batch_size,
                          float(ckpt.get("temperature", 1.0)), out_dir)
    rows = explain_images(Logits(net).to(device).eval(), classes, pre, paths, opts, device, field_of, not args.quiet)
    count, failed = write_rows(rows, output)
    print(f"explained {count - failed} of {count} image(s) with {args.method}: overlays in {display_path(out_dir)}"
          + (f", rows in {display_path(output[0])}" if output else ""), file=sys.stderr)
    if failed:
        print(f"{failed} of {count} image(s) could not be explained (see the error lines above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.run(main)
