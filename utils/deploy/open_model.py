"""Opening any model file for prediction and running predict.py: ONNX through ONNX Runtime without importing torch,
and a .pt2, a training checkpoint (.pth) or a TorchScript .pt through torch, imported only on those paths. The
engine comes from the file (utils.deploy.metadata.artifact_kind) unless forced; every engine feeds the same
prediction loop (utils.deploy.predict), so the output is the same for each. Torch-free at import.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace

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
from utils.model_info import with_temperature


@dataclass(frozen=True)
class PredictRequest:
    """What predict.py (and its alias predict_ckpoint.py) asks for: the model file and how to open it, the images,
    how the loop runs and what it outputs."""

    model: str
    image: list[str]
    engine: str = "auto"
    model_name: str | None = None  # a checkpoint's network name override
    img_size: int | None = None  # only for artifacts without preprocessing metadata
    classes: str | None = None
    device: str = "auto"
    loop: LoopOptions = field(default_factory=LoopOptions)
    out: OutputOptions = field(default_factory=OutputOptions)


def request_from_flags(model: str, engine: str, flags) -> PredictRequest:
    """The request from the parsed flags of add_predict_args (+ --model_name, --img_size where the script has them)."""
    return PredictRequest(model, list(flags.image), engine, getattr(flags, "model_name", None),
                          getattr(flags, "img_size", None), flags.classes, flags.device,
                          LoopOptions(flags.batch_size, flags.num_workers, WARMUP_RUNS, flags.repeats),
                          OutputOptions(flags.topk, flags.json, flags.output, flags.exist_ok, flags.quiet))


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


def load_onnx(req: PredictRequest):
    # idle ORT threads sleep rather than spin while decoding threads need the cores
    model = OnnxModel(req.model, req.device, spinning=req.loop.workers == 0)
    pre = model.preprocess or fallback_preprocess(req.img_size, model.input_shape, req.model)
    model.check_input(pre)
    return model, pre, model.metadata, model.num_outputs, model.providers[0], model.max_batch


def load_torch(req: PredictRequest, engine: str):
    """A .pt2, checkpoint or TorchScript file. Imports torch only here, so the ONNX path never pays for it."""
    from utils.deploy.artifacts import numpy_forward  # torch-dependent: imported only on this path

    device = cli.resolve_device(req.device)
    if engine == "pytorch":
        from utils.checkpoint import build_from_checkpoint, load_checkpoint

        ckpt = load_checkpoint(req.model)
        model, info = build_from_checkpoint(ckpt, req.model_name, source=req.model)
        precision = ckpt.get("precision", "fp32")
        meta = {"classes": info.classes, "preprocess": info.preprocess, "temperature": info.temperature,
                "precision": "fp16 weights, computed in fp32" if precision == "fp16" else precision}
        return numpy_forward(model.to(device), device), info.preprocess, meta, info.num_classes, str(device), None
    if engine == "pt2":
        from utils.deploy.pt2 import load_program

        program, meta = load_program(req.model, device)
    else:
        from utils.deploy.artifacts import load_torchscript

        program, meta = load_torchscript(req.model, device)
    pre = meta.get("preprocess") or fallback_preprocess(req.img_size, [], req.model)
    num = int(meta["num_classes"]) if "num_classes" in meta else None
    return numpy_forward(program, device), pre, meta, num, str(device), None


def predict_files(req: PredictRequest) -> int:
    """predict.py's work: open the model, run the loop (the same loop and output for every engine)."""
    check_output(req.out.output, req.out.exist_ok)  # before any work: never replace a file by accident
    engine = infer_engine(req.model, req.engine)
    paths = expand_images(req.image)
    if engine != "onnx":
        import torch  # noqa: F401  (imported before the clock starts: "model load" is the model, not torch)
    start = time.perf_counter()
    forward, pre, meta, num_outputs, device, max_batch = load_onnx(req) if engine == "onnx" else load_torch(req, engine)
    load_ms = (time.perf_counter() - start) * 1000.0
    loop = req.loop
    if max_batch is not None and max_batch < loop.batch_size:
        loop = replace(loop, batch_size=max_batch)  # exported with a fixed batch size: run it that way
    classes = resolve_classes(meta.get("classes"), load_class_names(req.classes), num_outputs)
    header = {"model": req.model, "engine": HEADER_ENGINE[engine],
              "precision": meta.get("precision", "fp32"), "device": device, "load_ms": load_ms, "warmup": WARMUP_RUNS}
    temperature = float(meta.get("temperature", 1.0))  # eval.py --calibrate: calibrated probabilities, same ranking
    if temperature != 1.0:
        header["temperature"] = temperature
        forward = with_temperature(forward, temperature)
    return run_prediction(forward, paths, pre, classes, header, req.out, loop)
