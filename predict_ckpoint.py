"""Classify images straight from a training checkpoint (PyTorch), with the same output as predict.py.

Examples:
  python predict_ckpoint.py --weights weights/FashionMNIST/custom/best.pth --image shoe.png
  python predict_ckpoint.py --weights best.pth --image photos/ --topk 3 --json --device cuda
  python predict_ckpoint.py --weights best.pth --image big_folder/ --output predictions.jsonl

Model, class names and preprocessing come from the checkpoint (EMA weights when it has them). Use
this to check a checkpoint before exporting it; deploy with export.py + predict.py, which start faster.
Batches, decoding threads, --output files and bad-file handling are predict.py's (the same loop).
"""

from __future__ import annotations

import argparse
import time

from utils import cli
from utils.checkpoint import build_from_checkpoint, load_checkpoint
from utils.deploy.artifacts import numpy_forward
from utils.deploy.predict import (
    WARMUP_RUNS,
    LoopOptions,
    OutputOptions,
    add_predict_args,
    check_output,
    expand_images,
    load_class_names,
    resolve_classes,
    run_prediction,
)
from utils.model_info import with_temperature


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--weights", required=True, metavar="CKPT", help="checkpoint written by train.py (or quantize.py --mode fp16)")
    cli.add_model_override_arg(p)
    add_predict_args(p)
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    check_output(args.output, args.exist_ok)  # before any work: never replace a file by accident
    paths = expand_images(args.image)
    device = cli.resolve_device(args.device)
    start = time.perf_counter()
    ckpt = load_checkpoint(args.weights)
    model, info = build_from_checkpoint(ckpt, args.model, source=args.weights)
    model = model.to(device)
    load_ms = (time.perf_counter() - start) * 1000.0
    classes = resolve_classes(info.classes, load_class_names(args.classes), info.num_classes)
    precision = ckpt.get("precision", "fp32")
    if precision == "fp16":
        precision = "fp16 weights, computed in fp32"
    header = {"model": args.weights, "engine": "pytorch", "precision": precision,
              "device": str(device), "load_ms": load_ms, "warmup": WARMUP_RUNS}
    opts = LoopOptions(args.batch_size, args.num_workers, WARMUP_RUNS, args.repeats)
    out = OutputOptions(args.topk, args.json, args.output, args.exist_ok, args.quiet)
    if info.temperature != 1.0:  # eval.py --calibrate: calibrated probabilities, the same ranking
        header["temperature"] = info.temperature
    forward = with_temperature(numpy_forward(model, device), info.temperature)
    return run_prediction(forward, paths, info.preprocess, classes, header, out, opts)


if __name__ == "__main__":
    cli.run(main)
