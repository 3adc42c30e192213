"""Classify images straight from a training checkpoint: the seed's name for `predict.py --model CKPT.pth`.

Examples:
  python predict_ckpoint.py --weights weights/FashionMNIST/custom/best.pth --image shoe.png
  python predict_ckpoint.py --weights best.pth --image photos/ --topk 3 --json --device cuda
  python predict_ckpoint.py --weights best.pth --image big_folder/ --output predictions.jsonl

A thin alias: it runs predict.py's main with `--model CKPT --engine pytorch` (and -m/--model as `--model_name`), so
the output, batches, decoding threads, --output files and bad-file handling are predict.py's. Model, class names and
preprocessing come from the checkpoint (EMA weights when it has them). Use it to check a checkpoint before exporting
it; deploy with export.py + predict.py on the .onnx, which starts faster.
"""

from __future__ import annotations

import argparse

import predict
from utils import cli
from utils.deploy.predict import add_predict_args


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--weights", required=True, metavar="CKPT", help="checkpoint written by train.py (or quantize.py --mode fp16)")
    cli.add_model_override_arg(p)
    add_predict_args(p)
    return p


def predict_argv(argv: list[str] | None) -> list[str]:
    """predict_ckpoint.py's flags as predict.py's: --weights -> --model (engine pytorch), -m/--model -> --model_name."""
    args = get_args_parser().parse_args(argv)
    out = ["--model", args.weights, "--engine", "pytorch", "--topk", str(args.topk), "--batch_size", str(args.batch_size),
           "--num_workers", str(args.num_workers), "--repeats", str(args.repeats), "--device", args.device, "--image",
           *args.image]
    for flag, value in (("--model_name", args.model), ("--classes", args.classes), ("--output", args.output)):
        if value is not None:
            out += [flag, value]
    out += [flag for flag, on in (("--exist_ok", args.exist_ok), ("--json", args.json), ("--quiet", args.quiet)) if on]
    return out


def main(argv=None) -> int:
    return predict.main(predict_argv(argv))


if __name__ == "__main__":
    cli.run(main)
