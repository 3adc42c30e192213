"""Classify images straight from a training checkpoint: the seed's name for `predict.py --model CKPT.pth`.

Examples:
  python predict_ckpoint.py --weights weights/FashionMNIST/custom/best.pth --image shoe.png
  python predict_ckpoint.py --weights best.pth --image photos/ --topk 3 --json --device cuda
  python predict_ckpoint.py --weights best.pth --image big_folder/ --output predictions.jsonl

A thin alias: it runs predict.py's work with `--model CKPT --engine pytorch` (and -m/--model as `--model_name`), so
the output, batches, decoding threads, --output files and bad-file handling are predict.py's. Model, class names and
preprocessing come from the checkpoint (EMA weights when it has them). Use it to check a checkpoint before exporting
it; deploy with export.py + predict.py on the .onnx, which starts faster.
"""

from __future__ import annotations

import argparse

from utils import cli
from utils.deploy.open_model import predict_files, request_from_flags
from utils.deploy.predict import add_predict_args


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--weights", required=True, metavar="CKPT", help="checkpoint written by train.py (or quantize.py --mode fp16)")
    cli.add_model_override_arg(p)
    add_predict_args(p)
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    args.model_name = args.model  # -m/--model here overrides the checkpoint's network, as predict.py's --model_name
    return predict_files(request_from_flags(args.weights, "pytorch", args))


if __name__ == "__main__":
    cli.run(main)
