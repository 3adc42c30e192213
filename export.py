"""Export a trained checkpoint to ONNX, a torch.export archive (.pt2) and/or TorchScript, verified against PyTorch
before it is written.

Examples:
  python export.py --weights weights/FashionMNIST/custom/best.pth                      # -> converted_models/custom.onnx
  python export.py --weights best.pth --engine pt2                                     # torch.export archive
  python export.py --weights best.pth --engine all                                     # ONNX, .pt2 and TorchScript
  python export.py --weights best.pth --half                                           # FP16 ONNX for GPUs (float32 in/out)
  python export.py --weights resnet18/best.pth --dynamic_size                          # any batch size AND any H/W

Model, class names and preprocessing come from the checkpoint and travel inside the artifact
(ONNX metadata_props / .pt2 and TorchScript extra file metadata.json), with the checkpoint's sha256, so
`predict.py --model <artifact>` needs nothing else. Default output:
<checkpoint dir>/converted_models/<model>[_fp16].onnx|.pt2|.pt.

Checks before the file appears under its final name: onnx.checker (full check); numeric parity of ONNX
Runtime (CPU), the reloaded .pt2 program or the reloaded TorchScript program against the PyTorch model on random batches of 1
and 7 images (plus another H/W with --dynamic_size) and on real preprocessed images (--parity_images,
or the first 16 validation images of the training data when it is on disk); metadata round trip.
The max absolute logit difference is printed; beyond the tolerance (FP32: 1e-4 (--atol), or 1e-5 (--rtol) of the
largest |logit| when that is larger, since float32 keeps ~7 digits; FP16: 2% of the largest |logit|) nothing
is written and the exit code is 1.

ONNX: the batch axis is always dynamic (torch.export dynamic_shapes). Exporter: the torch.export-based one
(dynamo, opset 18+) by default; --exporter legacy is PyTorch's deprecated TorchScript-based exporter (opset 17, for
runtimes older than opset 18), 4-50x faster to run (0.1-7 s against 4-32 s per registry model on one core)
but no longer maintained upstream (docs/deploy.md).
TorchScript (legacy, deprecated by PyTorch): scripted (keeps control flow, no baked-in shapes); traced only if
scripting fails. .pt2: torch.export.export + torch.export.save.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils import cli
from utils.checkpoint import build_from_checkpoint, load_checkpoint
from utils.deploy.export import DEFAULT_OPSET, LEGACY_OPSET, SUFFIXES, default_output, export_artifact
from utils.deploy.parity import FP32_ATOL, FP32_RTOL, ParityError, real_images


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--weights", required=True, metavar="CKPT", help="checkpoint written by train.py")
    cli.add_model_override_arg(p)
    p.add_argument("--engine", default="onnx", choices=["onnx", "pt2", "torchscript", "all"],
                   help="what to export: ONNX, torch.export archive (.pt2), TorchScript .pt (legacy), or all three")
    p.add_argument("--opset", type=cli.positive(), default=None,
                   help=f"ONNX opset (default {DEFAULT_OPSET}; {LEGACY_OPSET} with --exporter legacy)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"],
                   help="ONNX exporter: dynamo = torch.export-based; legacy = deprecated TorchScript-based, for old runtimes")
    p.add_argument("--dynamic_size", action="store_true",
                   help="make H and W dynamic too (only for models that run at any size: fully convolutional or "
                        "global-pooled, e.g. fcn_resnet18, resnet*, mobilenet*; not the custom FashionCNN)")
    p.add_argument("--half", action="store_true",
                   help="export an FP16 variant (for GPUs; inputs and outputs stay float32), named <model>_fp16.*")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="artifact path (default <checkpoint dir>/converted_models/<model>.onnx|.pt2|.pt); with --engine all, "
                        "the .onnx path, the .pt2 and .pt beside it")
    p.add_argument("--parity_images", nargs="+", default=None, metavar="IMG",
                   help="real images for the parity check (files, folder or glob); default: 16 validation images of "
                        "the training data, if still on disk")
    p.add_argument("--atol", type=cli.non_negative(float), default=FP32_ATOL, help="FP32 parity: allowed max absolute logit difference")
    p.add_argument("--rtol", type=cli.non_negative(float), default=FP32_RTOL,
                   help="FP32 parity: or this fraction of the largest |logit|, when that allows more (large logits)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    ckpt = load_checkpoint(args.weights)
    model, info = build_from_checkpoint(ckpt, args.model, source=args.weights)
    engines = ["onnx", "pt2", "torchscript"] if args.engine == "all" else [args.engine]
    real = real_images(info.preprocess, args.parity_images, ckpt.get("args"))
    if real is None:
        print("note: no real images for the parity check (training data not found): checking random batches only; "
              "pass --parity_images DIR to add real ones")
    status = 0
    for engine in engines:
        if args.output:
            output = Path(args.output) if engine == engines[0] else Path(args.output).with_suffix(SUFFIXES[engine])
        else:
            output = default_output(args.weights, info.model_name, engine, args.half)
        try:
            result = export_artifact(model, info, args.weights, engine, output, args.opset, args.dynamic_size, args.half,
                                     args.exporter, real, args.atol, args.rtol)
        except ParityError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"max |diff| vs PyTorch: {result.parity.max_abs_diff:.3g} (tolerance {result.parity.tolerance:.3g}) -> passed")
        print(f"wrote {result.path} ({result.size_mb:.2f} MB, {result.precision}, {result.method}; batch axis dynamic"
              f"{', H/W dynamic' if args.dynamic_size else ''})")
    return status


if __name__ == "__main__":
    cli.run(main)
