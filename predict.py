"""Classify images with an exported model: ONNX (ONNX Runtime, no torch import) or TorchScript.

Examples:
  python predict.py --model weights/FashionMNIST/custom/converted_models/custom.onnx --image shoe.png
  python predict.py --model custom.onnx --image photos/ --topk 3 --json
  python predict.py --model custom.pt --image 'samples/*.png' --device cuda
  python predict.py --model custom.onnx --image big_folder/ --output predictions.csv --batch_size 64

Class names and preprocessing (size, resize, crop, mean, std, channels) are read from the artifact's
metadata, written by export.py; --classes is only needed for artifacts without names. Images go
through the same eval transform as training-time validation (utils/data/preprocess.py): EXIF rotation,
any Pillow mode (grayscale, RGBA, palette, CMYK, 16-bit) converted to the model's channels.

Prints the top-k classes with probabilities per image, the model load time and the median inference
time per image (after warm-up). Images are decoded in threads while the model runs on batches of --batch_size;
--output FILE.csv or FILE.jsonl streams one row per image to a file instead (path, top-k classes and
probabilities, error), with a progress bar, in constant memory whatever the folder size. An image that cannot
be read (missing, not an image, truncated, refused by Pillow's decompression-bomb limit) or whose scores come
out NaN is reported on one line (and in the file's error column) and the others are still predicted; the exit
code is then 2. The ONNX path imports numpy, Pillow, tqdm and onnxruntime only.
"""

from __future__ import annotations

import argparse
import time

from utils import cli
from utils.data.preprocess import Preprocess
from utils.deploy.metadata import ONNX_SUFFIXES, TORCHSCRIPT_SUFFIXES, artifact_kind
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
from utils.deploy.runtime import OnnxModel
from utils.errors import InputError
from utils.model_info import with_temperature


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, metavar="ARTIFACT", help="an .onnx file or TorchScript .pt written by export.py")
    p.add_argument("--engine", default="auto", choices=["auto", "onnx", "torchscript"],
                   help="runtime; auto = from the extension (.onnx -> ONNX Runtime, .pt -> TorchScript)")
    p.add_argument("--img_size", type=cli.positive(), default=None,
                   help="crop size, only for artifacts without preprocessing metadata (ImageNet mean/std assumed)")
    add_predict_args(p)
    return p


def infer_engine(path: str, engine: str) -> str:
    if engine != "auto":
        return engine
    suffix = path.lower().rsplit(".", 1)[-1] if "." in path else ""
    if f".{suffix}" in ONNX_SUFFIXES:
        return "onnx"
    if f".{suffix}" in TORCHSCRIPT_SUFFIXES and artifact_kind(path) == "torchscript":
        return "torchscript"
    kind = artifact_kind(path)
    if kind == "checkpoint":
        raise InputError(f"{path} is a training checkpoint, not an exported model: use predict_ckpoint.py --weights {path} "
                         "(or export it first with export.py)")
    return kind


def fallback_preprocess(img_size: int | None, shape: list, path: str) -> Preprocess:
    """For artifacts exported elsewhere: the size from --img_size or the fixed input shape, ImageNet statistics."""
    channels = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else 3
    size = img_size or (shape[2] if len(shape) == 4 and isinstance(shape[2], int) else None)
    if size is None:
        raise InputError(f"{path} stores no preprocessing metadata and its input size is dynamic: pass --img_size")
    print(f"note: {path} has no preprocessing metadata; assuming {size} px crop, ImageNet mean/std (pass --img_size to change)")
    return Preprocess.for_size(size, channels)


def load_onnx(args):
    # idle ORT threads sleep rather than spin while decoding threads need the cores
    model = OnnxModel(args.model, args.device, spinning=args.num_workers == 0)
    pre = model.preprocess or fallback_preprocess(args.img_size, model.input_shape, args.model)
    model.check_input(pre)
    if model.max_batch is not None and model.max_batch < args.batch_size:
        args.batch_size = model.max_batch  # exported with a fixed batch size: run it that way
    return model, pre, model.metadata, model.num_outputs, model.providers[0]


def load_torchscript(args):
    """Imports torch only here, so the ONNX path never pays for it."""
    from utils.deploy.artifacts import load_torchscript as load  # torch-dependent: imported only on this path
    from utils.deploy.artifacts import numpy_forward

    device = cli.resolve_device(args.device)
    program, meta = load(args.model, device)
    pre = meta.get("preprocess") or fallback_preprocess(args.img_size, [], args.model)
    num = int(meta["num_classes"]) if "num_classes" in meta else None
    return numpy_forward(program, device), pre, meta, num, str(device)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    check_output(args.output, args.exist_ok)  # before any work: never replace a file by accident
    engine = infer_engine(args.model, args.engine)
    paths = expand_images(args.image)
    if engine == "torchscript":
        import torch  # noqa: F401  (imported before the clock starts: "model load" is the model, not torch)
    start = time.perf_counter()
    forward, pre, meta, num_outputs, device = load_onnx(args) if engine == "onnx" else load_torchscript(args)
    load_ms = (time.perf_counter() - start) * 1000.0
    classes = resolve_classes(meta.get("classes"), load_class_names(args.classes), num_outputs)
    header = {"model": args.model, "engine": "onnxruntime" if engine == "onnx" else "torchscript",
              "precision": meta.get("precision", "fp32"), "device": device, "load_ms": load_ms, "warmup": WARMUP_RUNS}
    opts = LoopOptions(args.batch_size, args.num_workers, WARMUP_RUNS, args.repeats)
    out = OutputOptions(args.topk, args.json, args.output, args.exist_ok, args.quiet)
    temperature = meta.get("temperature", 1.0)  # eval.py --calibrate, exported: calibrated probabilities, same ranking
    if temperature != 1.0:
        header["temperature"] = temperature
        forward = with_temperature(forward, temperature)
    return run_prediction(forward, paths, pre, classes, header, out, opts)


if __name__ == "__main__":
    cli.run(main)
