"""Export a trained network to ONNX or TorchScript, prove the file computes what PyTorch computes, then publish it.

Each export is written to a temporary name, checked (onnx.checker full check; numeric parity with ONNX
Runtime or the reloaded TorchScript module against the PyTorch model on random batches and real
preprocessed images; metadata round trip) and only then renamed to its final path. A failed check
removes the temporary file and raises ParityError.

Choices, and why:
- ONNX exporter: the TorchScript-based exporter (`dynamo=False`, opset 17 by default) is the default because it
  exports every registry model about 3x faster than the torch.export-based one on CPU and its dynamic axes
  need no shape constraints. `exporter="dynamo"` (PyTorch's newer default, opset 18+) is available and tested.
- TorchScript: scripted (`torch.jit.script`), not traced, so the saved program keeps Python control flow
  and has no shapes baked in (any batch size, and any H/W the network itself accepts). Models that cannot
  be scripted fall back to tracing, with a message saying so.
- FP16: ONNX is exported in FP32 and converted with onnxruntime's float16 converter keeping float32 inputs
  and outputs; TorchScript wraps the half-precision network in a float32 -> float16 -> float32 cast.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import count_parameters
from utils.data.preprocess import Preprocess, list_images, preprocess_file
from utils.errors import InputError
from utils.io import atomic_path, file_sha256
from utils.model_info import ModelInfo
from utils.runtime import TORCHSCRIPT_METADATA_FILE, OnnxModel, decode_metadata

DEFAULT_OPSET = 17
DYNAMO_MIN_OPSET = 18
FP32_ATOL = 1e-4  # FP32: max |diff| <= max(FP32_ATOL, FP32_RTOL * largest |reference logit|)
FP32_RTOL = 1e-5  # (float32 holds ~7 significant digits: logits of 1e4 cannot agree to 1e-4 absolute)
FP16_RTOL = 2e-2  # FP16: max |diff| <= FP16_RTOL * max(1, largest |reference logit|)
RANDOM_BATCH_SIZES = (1, 7)
REAL_IMAGE_COUNT = 16


class ParityError(Exception):
    """The exported artifact does not reproduce the PyTorch model (export.py exits 1)."""


# ----------------------------------------------------------------------------- metadata


def describe_preprocess(pre: Preprocess) -> str:
    """One human-readable line a user of the bare artifact can reimplement."""
    mode = "RGB" if pre.channels == 3 else "grayscale (L)"
    return (f"{mode} image, EXIF orientation applied; resize shorter side to {pre.resize} ({pre.interpolation}); "
            f"center-crop {pre.img_size}x{pre.img_size}; scale to [0, 1]; normalize mean={list(pre.mean)} "
            f"std={list(pre.std)}; layout NCHW float32, {pre.channels} channel(s)")


def build_metadata(info: ModelInfo, checkpoint: str | Path, precision: str, **extra) -> dict[str, str]:
    """String key/value pairs stored in ONNX metadata_props and in TorchScript's extra files."""
    pre: Preprocess = info.preprocess
    meta = {
        "model_name": info.model_name, "classes": json.dumps(list(info.classes)),
        "num_classes": str(len(info.classes)), "preprocess": pre.to_json(), "preprocessing": describe_preprocess(pre),
        "model_kwargs": json.dumps(info.model_kwargs, sort_keys=True), "precision": precision,
        "source_checkpoint": Path(checkpoint).name, "source_sha256": file_sha256(checkpoint),
        "torch_version": str(torch.__version__), "input": "input: float32 NCHW", "output": "logits: float32 (N, num_classes)",
    }
    meta.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in extra.items()})
    return meta


def default_output(checkpoint: str | Path, model_name: str, engine: str, half: bool = False) -> Path:
    """<checkpoint dir>/converted_models/<model>[_fp16].onnx|.pt"""
    suffix = ".onnx" if engine == "onnx" else ".pt"
    return Path(checkpoint).parent / "converted_models" / f"{model_name}{'_fp16' if half else ''}{suffix}"


# ----------------------------------------------------------------------------- inputs for the checks


def probe_size(pre: Preprocess) -> int:
    """A second input side (1.5x the training size) used to test and check dynamic H/W."""
    return int(round(pre.img_size * 1.5))


def supports_dynamic_size(model: nn.Module, pre: Preprocess) -> bool:
    """True when the network runs at another H/W (fully convolutional or global-pooled), False if fixed-size layers fail."""
    x = torch.zeros(1, pre.channels, probe_size(pre), probe_size(pre))
    try:
        with torch.inference_mode():
            model(x)
    except RuntimeError:
        return False
    return True


def random_batches(pre: Preprocess, dynamic_size: bool, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Standard-normal batches (the range normalised images live in) at batch sizes 1 and 7, and another H/W if dynamic."""
    rng = np.random.default_rng(seed)
    s = pre.img_size
    out = [(f"random batch {n}x{pre.channels}x{s}x{s}", rng.standard_normal((n, pre.channels, s, s)).astype(np.float32))
           for n in RANDOM_BATCH_SIZES]
    if dynamic_size:
        s2 = probe_size(pre)
        out.append((f"random batch 2x{pre.channels}x{s2}x{s2} (dynamic H/W)",
                    rng.standard_normal((2, pre.channels, s2, s2)).astype(np.float32)))
    return out


def _fashion_mnist_test_present(data_root: Path) -> bool:
    raw = data_root / "FashionMNIST" / "raw"
    return any((raw / f).is_file() for f in ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"))


def real_images(pre: Preprocess, image_spec: list[str] | None = None, train_args: dict | None = None,
                count: int = REAL_IMAGE_COUNT) -> tuple[str, np.ndarray] | None:
    """Up to `count` real images through the shared eval transform: from `image_spec`, else from the
    validation data the checkpoint was trained on (when it is still on disk). None if neither exists."""
    if image_spec:
        paths = list_images(image_spec)[:count]
        if not paths:
            raise InputError(f"--parity_images {' '.join(image_spec)}: no images found")
        return f"{len(paths)} real images from {' '.join(image_spec)}", np.stack([preprocess_file(p, pre) for p in paths])
    args = train_args or {}
    dataset, data_root = args.get("dataset"), Path(args.get("data_root") or "data")
    if dataset:
        from utils.data.datasets import val_folder

        val = val_folder(dataset)
        paths = list_images(val)[:count] if val.is_dir() else []
        if paths:
            return f"{len(paths)} real images from {val}", np.stack([preprocess_file(p, pre) for p in paths])
        return None
    if _fashion_mnist_test_present(data_root):
        from utils.data.datasets import EvalTransform, fashion_mnist

        ds = fashion_mnist(data_root, False, EvalTransform(pre))
        n = min(count, len(ds))
        return (f"{n} real Fashion-MNIST test images from {data_root}",
                np.stack([ds[i][0].numpy() for i in range(n)]))
    return None


# ----------------------------------------------------------------------------- parity


@dataclass
class ParityReport:
    tolerance: float
    scale: float  # largest |logit| of the reference
    checks: list[tuple[str, float, float]] = field(default_factory=list)  # (label, max abs diff, top-1 agreement)

    @property
    def max_abs_diff(self) -> float:
        return max((d for _, d, _ in self.checks), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def lines(self) -> list[str]:
        return [f"  {label}: max |diff| {d:.3g}, top-1 agreement {100 * a:.1f}%" for label, d, a in self.checks]


def tolerance_for(precision: str, reference_scale: float, atol: float = FP32_ATOL, rtol: float = FP32_RTOL) -> float:
    """FP32: `atol`, or `rtol` of the largest logit when that is larger; FP16: FP16_RTOL of max(1, largest logit)."""
    if precision == "fp32":
        return max(atol, rtol * reference_scale)
    return FP16_RTOL * max(1.0, reference_scale)


def describe_tolerance(precision: str, report: ParityReport, atol: float, rtol: float) -> str:
    if precision == "fp32":
        return f"{report.tolerance:.3g} = max(atol {atol:g}, rtol {rtol:g} x largest |logit| {report.scale:.3g})"
    return f"{report.tolerance:.3g} = {FP16_RTOL:g} x max(1, largest |logit| {report.scale:.3g})"


def check_parity(reference: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                 batches: list[tuple[str, np.ndarray]], precision: str = "fp32", atol: float = FP32_ATOL,
                 rtol: float = FP32_RTOL) -> ParityReport:
    """Run both on every batch; max absolute difference of the raw outputs and top-1 agreement per batch."""
    results, scale = [], 0.0
    for label, x in batches:
        ref, out = np.asarray(reference(x), dtype=np.float32), np.asarray(candidate(x), dtype=np.float32)
        if ref.shape != out.shape:
            raise ParityError(f"{label}: output shape {out.shape} differs from PyTorch's {ref.shape}")
        scale = max(scale, float(np.abs(ref).max()))
        agree = float((ref.reshape(len(ref), ref.shape[1], -1).mean(-1).argmax(1)
                       == out.reshape(len(out), out.shape[1], -1).mean(-1).argmax(1)).mean())
        results.append((label, float(np.abs(ref - out).max()), agree))
    return ParityReport(tolerance_for(precision, scale, atol, rtol), scale, results)


def torch_forward(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()
    return forward


# ----------------------------------------------------------------------------- writers


@contextlib.contextmanager
def quiet_export():
    """torch.onnx/torch.jit print deprecation and tracer warnings that tell the user nothing actionable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


class HalfPrecision(nn.Module):
    """Runs the wrapped network in float16 while taking and returning float32 tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def topological_sort(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs (onnx.checker requires it)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    produced_by_graph = {o for n in graph.node for o in n.output}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available or i not in produced_by_graph for i in n.input)]
        if not ready:
            raise ParityError("the ONNX graph has a cycle after FP16 conversion")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if n not in ready]
    nodes = [copy.deepcopy(n) for n in ordered]
    del graph.node[:]
    graph.node.extend(nodes)


def write_onnx(model: nn.Module, path: Path, pre: Preprocess, metadata: dict[str, str], opset: int,
               dynamic_size: bool, half: bool, exporter: str = "legacy") -> None:
    """Export (FP32 graph, optional FP16 conversion), attach metadata, run onnx.checker's full check."""
    import onnx

    example = torch.zeros(2, pre.channels, pre.img_size, pre.img_size)
    with torch.inference_mode():
        out_rank = model(example).dim()
    with quiet_export():
        if exporter == "dynamo":
            dims = {0: torch.export.Dim("batch", min=1)}
            if dynamic_size:
                dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
            program = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=opset, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=(dims,), verbose=False)
            program.save(str(path))
        elif exporter == "legacy":
            in_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
            out_axes = {0: "batch", 2: "out_height", 3: "out_width"} if dynamic_size and out_rank == 4 else {0: "batch"}
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": in_axes, "logits": out_axes},
                              do_constant_folding=True)
        else:
            raise InputError(f"unknown ONNX exporter {exporter!r}: use legacy or dynamo")
    proto = onnx.load(str(path))
    if half:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with quiet_export():
            proto = convert_float_to_float16(proto, keep_io_types=True)
        topological_sort(proto.graph)  # the converter appends the input Casts after their consumers
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"{metadata['model_name']} image classifier exported from {metadata['source_checkpoint']}"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def write_torchscript(model: nn.Module, path: Path, pre: Preprocess, metadata: dict[str, str], half: bool) -> str:
    """Script the network (trace if it cannot be scripted), save with metadata; returns 'scripted' or 'traced'."""
    module = HalfPrecision(copy.deepcopy(model)) if half else model
    with quiet_export():
        try:
            program, method = torch.jit.script(module), "scripted"
        except Exception as e:  # TorchScript raises many different frontend errors
            print(f"note: torch.jit.script failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); tracing instead, "
                  "so Python control flow is frozen to the path taken by the example input")
            example = torch.zeros(1, pre.channels, pre.img_size, pre.img_size)
            program, method = torch.jit.trace(module, example), "traced"
    meta = dict(metadata, torchscript=method)
    with quiet_export():
        torch.jit.save(program, str(path), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(meta, indent=1)})
    return method


def load_torchscript(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """torch.jit.load plus the metadata export.py stored beside the program."""
    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": nothing the user can act on
            program = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as e:
        raise InputError(f"cannot load TorchScript file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    text = extra[TORCHSCRIPT_METADATA_FILE]
    meta = decode_metadata(json.loads(text)) if text else {}
    return program.eval(), meta


# ----------------------------------------------------------------------------- export + verify + publish


@dataclass
class ExportResult:
    path: Path
    engine: str
    precision: str
    parity: ParityReport
    size_mb: float
    method: str  # exporter / scripted / traced


def _check_metadata(meta: dict, info: ModelInfo) -> None:
    if meta.get("classes") != list(info.classes) or meta.get("model_name") != info.model_name:
        raise ParityError("metadata did not survive the round trip (classes/model name differ after reload)")
    if meta.get("preprocess") != info.preprocess:
        raise ParityError("preprocessing metadata did not survive the round trip")


def export_artifact(model: nn.Module, info: ModelInfo, checkpoint: str | Path, engine: str, output: str | Path,
                    opset: int = DEFAULT_OPSET, dynamic_size: bool = False, half: bool = False, exporter: str = "legacy",
                    real: tuple[str, np.ndarray] | None = None, atol: float = FP32_ATOL, rtol: float = FP32_RTOL,
                    log=print) -> ExportResult:
    """Write one artifact (engine 'onnx' or 'torchscript') to a temporary file, verify it, then rename to `output`.

    Raises ParityError (temporary file removed, `output` untouched) when a check fails.
    """
    model = model.float().eval().cpu()
    pre: Preprocess = info.preprocess
    output = Path(output)
    if dynamic_size and not supports_dynamic_size(model, pre):
        raise InputError(f"--dynamic_size: {info.model_name} has layers of fixed input size (e.g. a Linear on flattened "
                         f"features) and fails at {probe_size(pre)} px; drop --dynamic_size (fully convolutional or "
                         "global-pooled models such as fcn_resnet18, ResNets, MobileNets support it)")
    precision = "fp16" if half else "fp32"
    params = count_parameters(model)
    reference = torch_forward(model)
    batches = random_batches(pre, dynamic_size) + ([real] if real is not None else [])
    with atomic_path(output) as tmp:
        if engine == "onnx":
            if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
                raise InputError(f"--opset {opset}: the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer")
            meta = build_metadata(info, checkpoint, precision, exporter=exporter, opset=opset, dynamic_size=dynamic_size,
                                  params=params)
            write_onnx(model, tmp, pre, meta, opset, dynamic_size, half, exporter)
            method = f"torch.onnx ({exporter} exporter, opset {opset})"
            candidate = OnnxModel(tmp, device="cpu")
            _check_metadata(candidate.metadata, info)
            forward = candidate.raw
        elif engine == "torchscript":
            meta = build_metadata(info, checkpoint, precision, dynamic_size=dynamic_size, params=params)
            method = write_torchscript(model, tmp, pre, meta, half)
            program, loaded_meta = load_torchscript(tmp)
            _check_metadata(loaded_meta, info)
            forward = torch_forward(program)
        else:
            raise InputError(f"unknown engine {engine!r}: use onnx or torchscript")
        report = check_parity(reference, forward, batches, precision, atol, rtol)
        log(f"{engine} {precision} parity vs PyTorch (tolerance {describe_tolerance(precision, report, atol, rtol)}):")
        for line in report.lines():
            log(line)
        if not report.passed:
            raise ParityError(f"{engine} {precision} export differs from PyTorch by {report.max_abs_diff:.3g} "
                              f"> tolerance {report.tolerance:.3g}; nothing written to {output}")
    return ExportResult(output, engine, precision, report, output.stat().st_size / 1e6, method)


# ----------------------------------------------------------------------------- loading any artifact for evaluation


@dataclass
class LoadedModel:
    """Anything eval.py, quantize.py and the benchmark can evaluate: a forward on torch batches plus facts about it."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    info: ModelInfo
    format: str  # pytorch, pytorch-fp16, onnx, onnx-fp16, onnx-int8, torchscript, torchscript-int8-fx, ...
    engine: str  # pytorch, onnxruntime, torchscript
    precision: str
    compute: str  # what actually ran, e.g. "fp32 (fp16 weights upcast on CPU)"
    device: torch.device  # where the evaluation batches go
    size_mb: float  # weights as stored (checkpoint) or the artifact file size
    params: int | None = None
    extra: dict = field(default_factory=dict)


def state_dict_mb(state: dict) -> float:
    return sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t)) / 1e6


def _logits(out: torch.Tensor) -> torch.Tensor:
    out = out.float()
    return out.mean(dim=(2, 3)) if out.dim() == 4 else out


def load_for_eval(path: str | Path, device: torch.device, model_name: str | None = None, ort_device: str = "auto",
                  ort_threads: int = 0) -> LoadedModel:
    """Open a checkpoint (FP32 or FP16), an .onnx (FP32/FP16/INT8) or a TorchScript .pt for evaluation."""
    from utils.checkpoint import build_from_checkpoint, load_checkpoint
    from utils.runtime import artifact_kind

    path = Path(path)
    kind = artifact_kind(path)
    file_mb = path.stat().st_size / 1e6
    if kind == "checkpoint":
        ckpt = load_checkpoint(path)
        model, info = build_from_checkpoint(ckpt, model_name)
        precision = ckpt.get("precision", "fp32")
        state = ckpt["ema"]["module"] if ckpt.get("ema") else ckpt["model"]
        params = count_parameters(model)
        if precision == "fp16" and device.type == "cuda":
            model, compute = HalfPrecision(model).to(device).eval(), "fp16 on CUDA"
        else:
            model = model.to(device)
            compute = "fp32 (fp16 weights upcast to fp32 on CPU)" if precision == "fp16" else "fp32"
        return LoadedModel(lambda x: _logits(model(x)), info, "pytorch" if precision == "fp32" else f"pytorch-{precision}",
                           "pytorch", precision, compute, device, state_dict_mb(state), params, {"file_mb": file_mb})
    if kind == "onnx":
        import onnxruntime

        onnx_model = OnnxModel(path, ort_device, threads=ort_threads)
        meta = onnx_model.metadata
        precision = meta.get("precision", "fp32")
        info = ModelInfo.from_metadata(meta, path.stem, str(path))

        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(onnx_model(x.cpu().numpy()))

        provider = onnx_model.providers[0]
        compute = f"{precision} on ONNX Runtime {provider}" + (" (CPU may run FP16 nodes through inserted casts)"
                                                                if precision == "fp16" and provider == "CPUExecutionProvider" else "")
        return LoadedModel(forward, info, "onnx" if precision == "fp32" else f"onnx-{precision}", "onnxruntime", precision,
                           compute, torch.device("cpu"), file_mb, int(meta["params"]) if "params" in meta else None,
                           {"file_mb": file_mb, "provider": provider, "onnxruntime": onnxruntime.__version__})
    meta_device = device
    program, meta = load_torchscript(path, "cpu")
    precision = meta.get("precision", "fp32")
    if precision.startswith("int8") and device.type == "cuda":
        print(f"note: {path.name} is a PyTorch-quantized INT8 program, which runs on CPU only: evaluating on CPU")
        meta_device = torch.device("cpu")
    program = program.to(meta_device)
    info = ModelInfo.from_metadata(meta, path.stem, str(path))

    def ts_forward(x: torch.Tensor) -> torch.Tensor:
        return _logits(program(x))

    return LoadedModel(ts_forward, info, "torchscript" if precision == "fp32" else f"torchscript-{precision}", "torchscript",
                       precision, f"{precision} TorchScript on {meta_device.type}", meta_device, file_mb,
                       int(meta["params"]) if "params" in meta else None, {"file_mb": file_mb, "torchscript": meta.get("torchscript")})


def evaluate_loaded(loaded: LoadedModel, loader, num_classes: int, speed_repeats: int = 20, show_progress: bool = True,
                    return_predictions: bool = False) -> dict:
    """acc@1/acc@5/loss/confusion via utils.engine.evaluate's forward hook, then batch-1 latency and throughput."""
    from utils.evaluation.loop import evaluate
    from utils.timing import latency_and_throughput

    with torch.inference_mode():
        stats = evaluate(None, loader, loaded.device, num_classes, forward=loaded.forward, show_progress=show_progress,
                         desc=f"eval {loaded.format}", return_predictions=return_predictions)
        if speed_repeats > 0:
            batch = next(iter(loader))[0].to(loaded.device)
            sync = torch.cuda.synchronize if loaded.device.type == "cuda" else None
            stats.update(latency_and_throughput(loaded.forward, batch[:1], batch, repeats=speed_repeats, sync=sync))
    return stats
