"""Opening any model file for prediction and running predict.py: ONNX through ONNX Runtime without importing torch,
and a .pt2, a training checkpoint (.pth) or a TorchScript .pt through torch, imported only on those paths. The
engine comes from the file (utils.deploy.metadata.artifact_kind) unless forced; every engine feeds the same
prediction loop (utils.deploy.predict), so the output is the same for each. Torch-free at import.
"""

from __future__ import annotations

import sys
import time

from utils import cli
from utils.data.preprocess import Preprocess
from utils.deploy.metadata import CHECKPOINT_SUFFIXES, ONNX_SUFFIXES, PT2_SUFFIXES, TORCHSCRIPT_SUFFIXES, artifact_kind
from utils.deploy.predict import (
    WARMUP_RUNS,
    LoopOptions,
    OutputOptions,
    check_output,
    expand_images,
    load_class_names,
    resolve_classes,
    run_prediction,
)
from utils.deploy.runtime import OnnxModel
from utils.errors import InputError

ENGINES = ["auto", "onnx", "pt2", "pytorch", "torchscript"]
KIND_ENGINE = {"onnx": "onnx", "pt2": "pt2", "checkpoint": "pytorch", "torchscript": "torchscript"}
HEADER_ENGINE = {"onnx": "onnxruntime", "pt2": "torch.export", "pytorch": "pytorch", "torchscript": "torchscript"}


def infer_engine(path: str, engine: str) -> str:
    """--engine, or the engine of the file: the ONNX suffix alone decides without opening it (the torch-free path);
    other files are told apart by their contents (utils.deploy.metadata.artifact_kind)."""
    if engine != "auto":
        return engine
    suffix = "." + path.lower().rsplit(".", 1)[-1] if "." in path else ""
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    kind = artifact_kind(path)
    expected = ("pt2" if suffix in PT2_SUFFIXES else "checkpoint" if suffix in CHECKPOINT_SUFFIXES
                else "torchscript" if suffix in TORCHSCRIPT_SUFFIXES else kind)
    if kind != expected:
        print(f"note: {path} holds a {kind} despite its {suffix} name; predicting with it as a {kind}", file=sys.stderr)
    return KIND_ENGINE[kind]


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


def load_torch(args, engine: str):
    """A .pt2, checkpoint or TorchScript file. Imports torch only here, so the ONNX path never pays for it."""
    from utils.deploy.artifacts import numpy_forward  # torch-dependent: imported only on this path

    device = cli.resolve_device(args.device)
    if engine == "pytorch":
        from utils.checkpoint import build_from_checkpoint, load_checkpoint

        ckpt = load_checkpoint(args.model)
        model, info = build_from_checkpoint(ckpt, args.model_name, source=args.model)
        precision = ckpt.get("precision", "fp32")
        meta = {"classes": info.classes, "preprocess": info.preprocess,
                "precision": "fp16 weights, computed in fp32" if precision == "fp16" else precision}
        return numpy_forward(model.to(device), device), info.preprocess, meta, info.num_classes, str(device)
    if engine == "pt2":
        from utils.deploy.pt2 import load_program

        program, meta = load_program(args.model, device)
    else:
        from utils.deploy.artifacts import load_torchscript

        program, meta = load_torchscript(args.model, device)
    pre = meta.get("preprocess") or fallback_preprocess(args.img_size, [], args.model)
    num = int(meta["num_classes"]) if "num_classes" in meta else None
    return numpy_forward(program, device), pre, meta, num, str(device)


def predict_files(args) -> int:
    """predict.py's work on its parsed flags (predict_ckpoint.py passes its own, mapped): open the model, run the loop."""
    check_output(args.output, args.exist_ok)  # before any work: never replace a file by accident
    engine = infer_engine(args.model, args.engine)
    paths = expand_images(args.image)
    if engine != "onnx":
        import torch  # noqa: F401  (imported before the clock starts: "model load" is the model, not torch)
    start = time.perf_counter()
    forward, pre, meta, num_outputs, device = load_onnx(args) if engine == "onnx" else load_torch(args, engine)
    load_ms = (time.perf_counter() - start) * 1000.0
    classes = resolve_classes(meta.get("classes"), load_class_names(args.classes), num_outputs)
    header = {"model": args.model, "engine": HEADER_ENGINE[engine],
              "precision": meta.get("precision", "fp32"), "device": device, "load_ms": load_ms, "warmup": WARMUP_RUNS}
    opts = LoopOptions(args.batch_size, args.num_workers, WARMUP_RUNS, args.repeats)
    out = OutputOptions(args.topk, args.json, args.output, args.exist_ok, args.quiet)
    return run_prediction(forward, paths, pre, classes, header, out, opts)
